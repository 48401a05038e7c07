"""Runtime sessions: a model loaded once in its format's own runtime.

A format plugin returns a :class:`Session` from ``convcore_open_session``; the CLI's
``infer`` and ``compare`` (and later ``serve``) hold one per model, so generation costs
one forward step per token with the runtime's KV cache, not a reload and a full
re-run of the sequence.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from .model import ConvcoreError


class Session:
    """A model open in a runtime. Subclasses implement :meth:`logits`, :meth:`decode`
    and :meth:`close`; :meth:`generate` (greedy) is built on those and may be replaced
    by a runtime's own loop.

    Use it as a context manager so the runtime is closed on every path::

        with registry.open_session("model.gguf") as s:
            first = s.logits([1, 2, 3])
            for token in s.generate([1, 2, 3], max_tokens=20):
                ...
    """

    #: vocabulary size (the logits' last axis); set by the subclass
    vocab_size: int = 0
    #: the model's end-of-generation token ids, as its runtime knows them
    stop_ids: tuple[int, ...] = ()
    #: "decoder" (logits, decode, generate) or "encoder" (embed, hidden_states)
    kind: str = "decoder"

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Start over: float32 logits ``(len(token_ids), vocab)`` for every position of
        ``token_ids``, which the session's cache then holds."""
        raise NotImplementedError

    def decode(self, token_ids: Sequence[int]) -> np.ndarray:
        """Append ``token_ids`` after what the cache holds; float32 logits
        ``(len(token_ids), vocab)`` for the appended positions."""
        raise NotImplementedError

    def close(self) -> None:
        """Free the runtime. Idempotent."""

    def embed(self, token_ids: Sequence[int]) -> np.ndarray:
        """Encoders: the sentence embedding of ``token_ids`` (float32, ``(dim,)``), pooled
        as the model says (sentence-transformers' pooling and normalisation)."""
        raise ConvcoreError(f"{type(self).__name__}: this model is a decoder; it has logits, "
                            "not sentence embeddings")

    def hidden_states(self, token_ids: Sequence[int]) -> np.ndarray:
        """Encoders: the last hidden states ``(len(token_ids), dim)`` in float32."""
        raise ConvcoreError(f"{type(self).__name__}: this runtime does not give hidden states")

    def generate(self, prompt_ids: Sequence[int], max_tokens: int,
                 stop_ids: Sequence[int] = ()) -> Iterator[int]:
        """Greedy decoding: yield up to ``max_tokens`` token ids after ``prompt_ids``,
        stopping after a token in ``stop_ids``."""
        if max_tokens <= 0:
            return
        yield from self.extend(self.logits(prompt_ids)[-1], max_tokens, stop_ids)

    def extend(self, last_logits: np.ndarray, max_tokens: int,
               stop_ids: Sequence[int] = ()) -> Iterator[int]:
        """Greedy decoding after what the cache holds, whose last position's logits are
        ``last_logits`` (e.g. the last row of :meth:`logits`)."""
        last = last_logits
        stops = set(stop_ids)
        for i in range(max_tokens):
            token = int(np.argmax(last))
            yield token
            if token in stops or i + 1 == max_tokens:
                return
            last = self.decode([token])[-1]

    def end_ids(self, tokenizer: Any = None) -> tuple[int, ...]:
        """The ids that end a generation: the runtime's own, and the end-of-text id of
        ``tokenizer`` (an object with ``eos_token_id``, e.g. the model's transformers
        tokenizer) when given."""
        eos = getattr(tokenizer, "eos_token_id", None)
        return tuple(self.stop_ids) + ((int(eos),) if eos is not None else ())

    def check_ids(self, token_ids: Sequence[int]) -> list[int]:
        """``token_ids`` as ints, or a one-line error for an empty list or an id outside
        the vocabulary (runtimes crash or read out of bounds on those)."""
        ids = [int(t) for t in token_ids]
        if not ids:
            raise ConvcoreError("no tokens to run")
        bad = [t for t in ids if not 0 <= t < self.vocab_size] if self.vocab_size else []
        if bad:
            raise ConvcoreError(f"token id {bad[0]} is outside the vocabulary of {self.vocab_size}")
        return ids

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
