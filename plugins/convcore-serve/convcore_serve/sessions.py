"""A pool of runtime sessions for serving: each model opened on first use, at most
``max_loaded`` open at once, the least recently used closed to make room.

Sessions are not thread-safe, so each open model has a lock held for a whole request;
requests for one model queue, requests for different models run side by side. Every
method that may load or run a model blocks: call it from a worker thread, never on an
event loop.
"""
from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from convcore import fidelity
from convcore.model import ConvcoreError, one_line
from convcore.registry import get_registry
from convcore.runtime import Session

if TYPE_CHECKING:
    from . import ServedModel

#: context of a session when neither ``--ctx`` nor the model says less
DEFAULT_CTX = 4096


class LoadError(ConvcoreError):
    """A served model that does not open: its file, its runtime or its tokenizer."""


class Tokenizer:
    """A model's transformers tokenizer behind a lock: a fast tokenizer's Rust state must
    not be used from two threads at once."""

    def __init__(self, tokenizer: Any):
        self._tok = tokenizer
        self._lock = threading.Lock()
        self.eos_token_id: int | None = tokenizer.eos_token_id
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with the tokenizer's own special tokens (BOS), as
        ``convcore infer --prompt`` tokenizes."""
        with self._lock:
            return [int(t) for t in self._tok(text).input_ids]

    def chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of ``messages`` rendered with the model's chat template, ending with
        the prompt for the assistant's turn."""
        with self._lock:
            out = self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        # transformers 5 returns a BatchEncoding here, 4.x a plain list
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return [int(t) for t in ids]

    def decode(self, ids: Sequence[int]) -> str:
        with self._lock:
            return str(self._tok.decode(list(ids)))


@dataclass
class Prepared:
    """What a model needs before its runtime opens: its tokenizer (None when it has no
    usable one, with the reason) and the context its sessions get."""

    n_ctx: int
    tokenizer: Tokenizer | None
    no_tokenizer: str = ""


@dataclass
class Loaded:
    """An open session and what requests share about it."""

    session: Session
    stop_ids: tuple[int, ...]
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0
    evicted: bool = False

    def close(self) -> None:
        self.session.close()


class SessionPool:
    """Sessions for ``models`` (id -> :class:`~convcore_serve.ServedModel`), opened with
    ``{"n_ctx", "threads", "verbose": False}`` on first use, at most ``max_loaded`` open."""

    def __init__(self, models: Sequence["ServedModel"], max_loaded: int = 2,
                 ctx: int | None = None, threads: int | None = None):
        if max_loaded < 1:
            raise ConvcoreError(f"--max-loaded must be at least 1, not {max_loaded}")
        self.models: dict[str, ServedModel] = {m.id: m for m in models}
        self.max_loaded = max_loaded
        self.ctx = ctx
        self.threads = threads
        self._lock = threading.Lock()  # guards the dicts below and every Loaded's users/evicted
        self._loaded: OrderedDict[str, Loaded] = OrderedDict()  # least recently used first
        self._prepared: dict[str, Prepared] = {}
        self._model_locks = {m.id: threading.Lock() for m in models}  # one load at a time per model

    def loaded(self) -> list[str]:
        """Ids of the open models, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def prepare(self, model_id: str) -> Prepared:
        """The model's tokenizer and context, read once (its headers, not its weights)."""
        with self._lock:
            if model_id in self._prepared:
                return self._prepared[model_id]
        with self._model_locks[model_id]:
            with self._lock:
                if model_id in self._prepared:
                    return self._prepared[model_id]
            served = self.models[model_id]
            try:
                model = get_registry().load(served.path, served.fmt)
            except Exception as exc:  # noqa: BLE001 - any failure is this model's, one line
                raise LoadError(f"{model_id}: {one_line(exc)}") from None
            context = model.config.get("max_position_embeddings")
            n_ctx = self.ctx or min(int(context) if isinstance(context, int) and context > 0
                                    else DEFAULT_CTX, DEFAULT_CTX)
            try:
                prepared = Prepared(n_ctx, Tokenizer(fidelity.tokenizer_for(model)))
            except ConvcoreError as exc:
                prepared = Prepared(n_ctx, None, str(exc))
            with self._lock:
                self._prepared[model_id] = prepared
            return prepared

    @contextlib.contextmanager
    def use(self, model_id: str) -> Iterator[Loaded]:
        """The model's session, opened if need be, with its lock held inside the block."""
        loaded = self._checkout(model_id)
        try:
            with loaded.lock:
                yield loaded
        finally:
            with self._lock:
                loaded.users -= 1
                close = loaded.evicted and loaded.users == 0
            if close:
                loaded.close()

    def _checkout(self, model_id: str) -> Loaded:
        prepared = self.prepare(model_id)
        with self._model_locks[model_id]:
            with self._lock:
                loaded = self._loaded.get(model_id)
                if loaded is not None:
                    self._loaded.move_to_end(model_id)
                    loaded.users += 1
                    return loaded
                # make room before opening, so at most max_loaded models sit in memory
                idle = self._evict(self.max_loaded - 1)
            for victim in idle:
                victim.close()
            loaded = self._open(model_id, prepared)
            with self._lock:
                self._loaded[model_id] = loaded
                loaded.users += 1
                idle = self._evict(self.max_loaded)  # another model opened meanwhile
            for victim in idle:
                victim.close()
            return loaded

    def _evict(self, keep: int) -> list[Loaded]:
        """Drop the least recently used sessions until ``keep`` are left (with the pool's
        lock held); returns those idle, to close. One still running a request is closed
        when that request ends."""
        idle = []
        while len(self._loaded) > keep:
            _, victim = self._loaded.popitem(last=False)
            victim.evicted = True
            if victim.users == 0:
                idle.append(victim)
        return idle

    def _open(self, model_id: str, prepared: Prepared) -> Loaded:
        served = self.models[model_id]
        options: dict[str, Any] = {"n_ctx": prepared.n_ctx, "verbose": False}
        if self.threads:
            options["threads"] = self.threads
        if served.lora:
            options["lora"] = list(served.lora)
        try:
            session = get_registry().open_session(served.path, served.fmt, options)
        except Exception as exc:  # noqa: BLE001 - any failure is this model's, one line
            raise LoadError(f"{model_id}: {one_line(exc)}") from None
        # the stop ids ``convcore infer --prompt`` uses
        return Loaded(session, session.end_ids(prepared.tokenizer))

    def close(self) -> None:
        """Close every open session (those still in use when their request ends)."""
        with self._lock:
            idle = self._evict(0)
        for victim in idle:
            victim.close()
