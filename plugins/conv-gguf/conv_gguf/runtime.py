"""The gguf format's runtime: llama.cpp through llama-cpp-python (the ``[infer]``
extra), loaded once, with llama.cpp's own KV cache."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from convcore import ConvcoreError, Session

from .checks import read_header

GGML_TYPE_F32 = 0
_QUIET: Any = None   # the ctypes callback must outlive every call that may log


def _route_logs(llama_cpp: Any, verbose: bool) -> None:
    """llama.cpp logs through a process-wide callback; llama-cpp-python's own lets some
    warnings through even with ``verbose=False`` (``llama_kv_cache_iswa: ...``), so
    install one that drops everything unless the user asked for ``--verbose``."""
    global _QUIET
    import ctypes

    if verbose:
        from llama_cpp import _logger
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        return
    if _QUIET is None:
        _QUIET = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p(0))


class LlamaCppSession(Session):
    """A GGUF file loaded with ``llama_cpp.Llama``. The KV cache is f32 so the only
    rounding in the logits is the model's own."""

    def __init__(self, path: Path, options: dict[str, Any]):
        try:
            import llama_cpp
        except ImportError:
            raise ConvcoreError("gguf inference needs llama-cpp-python "
                                "(pip install 'conv-gguf[infer]')") from None
        read_header(Path(path))   # a bad file gives one line, not a crash inside llama.cpp
        verbose = bool(options.get("verbose"))
        _route_logs(llama_cpp, verbose)
        n_ctx = max(64, int(options.get("n_ctx") or 512))
        kwargs: dict[str, Any] = dict(logits_all=True, n_ctx=n_ctx, n_batch=min(n_ctx, 512),
                                      verbose=verbose, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
        if options.get("threads"):
            kwargs["n_threads"] = int(options["threads"])
        try:
            self.llm = llama_cpp.Llama(str(path), **kwargs)
        except ValueError as exc:
            raise ConvcoreError(f"{path}: llama.cpp cannot load it ({exc})") from None
        self.n_ctx = n_ctx
        self.vocab_size = self.llm.n_vocab()
        self.stop_ids = tuple(t for t in (self.llm.token_eos(),) if t is not None and t >= 0)

    def _eval(self, ids: list[int]) -> np.ndarray:
        start = self.llm.n_tokens
        if start + len(ids) > self.n_ctx:
            raise ConvcoreError(f"{start + len(ids)} tokens exceed the session's context of "
                                f"{self.n_ctx}")
        self.llm.eval(ids)
        return np.array(self.llm.scores[start:start + len(ids)], dtype=np.float32)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = self.check_ids(token_ids)
        self.llm.reset()
        return self._eval(ids)

    def decode(self, token_ids: Sequence[int]) -> np.ndarray:
        if self.llm.n_tokens == 0:
            raise ConvcoreError("decode() before logits(): nothing to continue")
        return self._eval(self.check_ids(token_ids))

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.close()
