"""Text generation on a runtime session: greedy or sampled token ids, and the text they
decode to, released piece by piece as it becomes final.

Greedy decoding is the session's own :meth:`~convcore.runtime.Session.extend`, the loop
``convcore infer --max-tokens`` runs, so a server's greedy text is the CLI's. Sampling
draws from a NumPy ``Generator`` seeded by the request, so a seed repeats its text.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from convcore.runtime import Session

#: what a decoder writes for bytes that do not (yet) form a character
REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens: ``temperature`` 0 is greedy; above it, sample from the
    softmax of ``logits / temperature`` cut to the smallest set holding ``top_p`` of the
    mass. ``stop`` strings end the text before their first occurrence."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """One token id drawn from ``logits`` (the vocabulary's, one position)."""
    x = np.asarray(logits, dtype=np.float64) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_p >= 1.0:
        return int(rng.choice(p.size, p=p))
    order = np.argsort(-p, kind="stable")
    mass = np.cumsum(p[order])
    keep = order[:int(np.searchsorted(mass, top_p)) + 1]
    q = p[keep] / p[keep].sum()
    return int(keep[rng.choice(keep.size, p=q)])


def generate(session: Session, prompt_ids: Sequence[int], sampling: Sampling,
             stop_ids: Sequence[int] = ()) -> Iterator[int]:
    """Yield up to ``sampling.max_tokens`` token ids after ``prompt_ids``, ending after a
    token of ``stop_ids``. Lazy: a caller that stops iterating stops the runtime."""
    if sampling.max_tokens <= 0:
        return
    last = session.logits(prompt_ids)[-1]
    if sampling.temperature <= 0:
        yield from session.extend(last, sampling.max_tokens, stop_ids)
        return
    # NumPy seeds are unsigned; any integer a client sends maps to one
    rng = np.random.default_rng(None if sampling.seed is None else sampling.seed % 2 ** 64)
    stops = set(stop_ids)
    for i in range(sampling.max_tokens):
        token = sample(last, sampling.temperature, sampling.top_p, rng)
        yield token
        if token in stops or i + 1 == sampling.max_tokens:
            return
        last = session.decode([token])[-1]


BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _byte_tokens(tokenizer: Any) -> frozenset[int]:
    """The ids of ``tokenizer``'s byte-fallback tokens (``<0x00>``..``<0xFF>``), found once."""
    found = getattr(tokenizer, "_convcore_byte_tokens", None)
    if found is None:
        inner = getattr(tokenizer, "_tok", tokenizer)   # serve's locked wrapper, or the tokenizer
        vocab = inner.get_vocab() if hasattr(inner, "get_vocab") else {}
        found = frozenset(int(i) for t, i in vocab.items() if BYTE_TOKEN.fullmatch(t))
        try:
            tokenizer._convcore_byte_tokens = found
        except AttributeError:
            pass
    return found


class IncrementalText:
    """The text of a growing list of token ids, handed out in pieces that never change.

    Each :meth:`push` decodes the whole list (a token's text depends on its neighbours:
    SentencePiece's leading space, a character split over byte tokens) and releases the
    new end of it, holding back a trailing U+FFFD (a character whose bytes have not all
    arrived) and any ending that may be the start of a stop string. The pieces joined are
    the decoded text of all the ids, cut before the first stop string."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one generated id; returns the text that became final (maybe empty).

        Nothing is released while the ids end with byte-fallback tokens (``<0xNN>``): a
        SentencePiece decoder turns a run of them into text only as a whole, and when the
        run is not valid UTF-8 every byte of it becomes U+FFFD, a valid first byte too; so
        the run's text is final only once a token that is not a byte follows it."""
        self.ids.append(int(token))
        if int(token) in _byte_tokens(self._tokenizer):
            return ""
        decoded = self._tokenizer.decode(self.ids)
        cut = self._first_stop(decoded)
        if cut is not None:
            self.stopped = True
            return self._release(decoded[:cut])
        ready = decoded.rstrip(REPLACEMENT)
        return self._release(ready[:len(ready) - self._partial_stop(ready)])

    def flush(self) -> str:
        """The text held back, once no more ids will come."""
        if self.stopped or not self.ids:
            return ""
        return self._release(self._tokenizer.decode(self.ids))

    def _first_stop(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        return min(found) if found else None

    def _partial_stop(self, text: str) -> int:
        """Length of the longest ending of ``text`` that begins a stop string."""
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _release(self, upto: str) -> str:
        # text already handed out is never taken back: should a longer list decode its
        # beginning differently, the difference is not re-sent
        if len(upto) <= len(self.text) or not upto.startswith(self.text):
            return ""
        piece, self.text = upto[len(self.text):], upto
        return piece
