"""The gguf format's runtime: llama.cpp through llama-cpp-python (the ``[infer]``
extra), loaded once, with llama.cpp's own KV cache.

Files of an encoder (BERT: ``{arch}.attention.causal = false``) open as embedding models:
``kind`` is "encoder", :meth:`LlamaCppSession.embed` gives the pooled embedding llama.cpp
computes with the file's pooling type (mean where the file names none, as
sentence-transformers pools a model without its files), and there are no logits."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from convcore import ConvcoreError, Session

from . import arch_table
from .archs import POOLING_TYPES
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


def is_encoder(kv: dict[str, Any]) -> bool:
    """Whether the GGUF keys ``kv`` describe an embedding model (non-causal attention,
    or an architecture registered as an encoder)."""
    arch = kv.get("general.architecture")
    spec = arch_table.read_back().get(arch) if isinstance(arch, str) else None
    return kv.get(f"{arch}.attention.causal") is False or bool(spec and spec.encoder)


class LlamaCppSession(Session):
    """A GGUF file loaded with ``llama_cpp.Llama``. The KV cache is f32 so the only
    rounding in the logits is the model's own. Encoders are loaded with
    ``embedding=True`` and the whole context in one batch (llama.cpp needs every token
    of a non-causal sequence in the same micro-batch)."""

    def __init__(self, path: Path, options: dict[str, Any]):
        try:
            import llama_cpp
        except ImportError:
            raise ConvcoreError("gguf inference needs llama-cpp-python "
                                "(pip install 'conv-gguf[infer]')") from None
        self._llama_cpp = llama_cpp
        self.path = Path(path)
        # a bad file gives one line, not a crash inside llama.cpp
        kv = read_header(self.path).kv
        self.arch = str(kv.get("general.architecture"))
        self.kind = "encoder" if is_encoder(kv) else "decoder"
        verbose = bool(options.get("verbose"))
        _route_logs(llama_cpp, verbose)
        n_ctx = max(64, int(options.get("n_ctx") or 512))
        if self.kind == "encoder":
            limit = kv.get(f"{self.arch}.context_length")
            n_ctx = min(n_ctx, limit) if isinstance(limit, int) and limit > 0 else n_ctx
            pooling = kv.get(f"{self.arch}.pooling_type")
            if not isinstance(pooling, int) or pooling == POOLING_TYPES["none"]:
                pooling = POOLING_TYPES["mean"]
            self.pooling_type = int(pooling)
            kwargs: dict[str, Any] = dict(embedding=True, pooling_type=self.pooling_type, n_ctx=n_ctx,
                                          n_batch=n_ctx, n_ubatch=n_ctx, verbose=verbose)
        else:
            kwargs = dict(logits_all=True, n_ctx=n_ctx, n_batch=min(n_ctx, 512),
                          verbose=verbose, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
        if options.get("threads"):
            kwargs["n_threads"] = int(options["threads"])
        loras = list(options.get("lora") or ())
        if len(loras) > 1:
            raise ConvcoreError(f"{path}: llama-cpp-python applies one LoRA adapter; merge the others "
                                "(convcore run BASE --lora ADAPTER)")
        if loras:
            adapter = Path(loras[0][0])
            if read_header(adapter).kv.get("general.type") != "adapter":
                raise ConvcoreError(f"{adapter}: not a LoRA adapter GGUF (general.type is not 'adapter'); "
                                    "convert one with: convcore run ADAPTER --to gguf --base BASE")
            kwargs.update(lora_path=str(adapter), lora_scale=float(loras[0][1]))
        self._kwargs = kwargs
        try:
            self.llm = llama_cpp.Llama(str(path), **kwargs)
        except ValueError as exc:
            raise ConvcoreError(f"{path}: llama.cpp cannot load it ({exc})") from None
        except RuntimeError as exc:   # llama-cpp-python's "Failed to load LoRA adapter"
            raise ConvcoreError(f"{path}: llama.cpp cannot apply {loras[0][0]} ({exc})") from None
        self.lora_applied = bool(loras)
        self._per_token: Any = None    # a second context without pooling, made on demand
        self.n_ctx = n_ctx
        self.vocab_size = self.llm.n_vocab()
        if self.kind == "encoder":
            self.stop_ids = ()
        else:
            self.stop_ids = tuple(t for t in (self.llm.token_eos(),) if t is not None and t >= 0)

    def _no_logits(self) -> ConvcoreError:
        return ConvcoreError(f"{self.path}: {self.arch} is an embedding model; it has no logits")

    def _encode(self, llm: Any, token_ids: Sequence[int]) -> int:
        """Run one sequence through an embedding context; returns its length."""
        ids = self.check_ids(token_ids)
        if len(ids) > self.n_ctx:
            raise ConvcoreError(f"{len(ids)} tokens exceed the session's context of {self.n_ctx}")
        llm._batch.reset()
        llm._ctx.kv_cache_clear()
        llm._batch.add_sequence(ids, 0, True)
        try:
            llm._ctx.decode(llm._batch)
        except RuntimeError as exc:
            raise ConvcoreError(f"{self.path}: llama.cpp failed to embed ({exc})") from None
        finally:
            llm._batch.reset()
        return len(ids)

    def embed(self, token_ids: Sequence[int]) -> np.ndarray:
        """The pooled embedding of ``token_ids`` as llama.cpp computes it (float32,
        ``(n_embd,)``; not normalised, as ``Llama.embed`` by default)."""
        if self.kind != "encoder":
            return super().embed(token_ids)
        self._encode(self.llm, token_ids)
        ptr = self._llama_cpp.llama_get_embeddings_seq(self.llm._ctx.ctx, 0)
        if not ptr:
            raise ConvcoreError(f"{self.path}: llama.cpp returned no pooled embedding")
        n_embd = self.llm.n_embd()
        out = np.ctypeslib.as_array(ptr, shape=(n_embd,)).astype(np.float32, copy=True)
        self.llm._ctx.kv_cache_clear()
        return out

    def hidden_states(self, token_ids: Sequence[int]) -> np.ndarray:
        """The last layer's output for every token, ``(len(token_ids), n_embd)`` float32,
        from a second context of the same file without pooling (made on first use)."""
        if self.kind != "encoder":
            return super().hidden_states(token_ids)
        if self._per_token is None:
            kwargs = {**self._kwargs, "pooling_type": POOLING_TYPES["none"]}
            self._per_token = self._llama_cpp.Llama(str(self.path), **kwargs)
        llm = self._per_token
        n = self._encode(llm, token_ids)
        ptr = self._llama_cpp.llama_get_embeddings(llm._ctx.ctx)
        if not ptr:
            raise ConvcoreError(f"{self.path}: llama.cpp returned no token embeddings")
        out = np.ctypeslib.as_array(ptr, shape=(n, llm.n_embd())).astype(np.float32, copy=True)
        llm._ctx.kv_cache_clear()
        return out

    def _eval(self, ids: list[int]) -> np.ndarray:
        start = self.llm.n_tokens
        if start + len(ids) > self.n_ctx:
            raise ConvcoreError(f"{start + len(ids)} tokens exceed the session's context of "
                                f"{self.n_ctx}")
        self.llm.eval(ids)
        return np.array(self.llm.scores[start:start + len(ids)], dtype=np.float32)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        if self.kind == "encoder":
            raise self._no_logits()
        ids = self.check_ids(token_ids)
        self.llm.reset()
        return self._eval(ids)

    def decode(self, token_ids: Sequence[int]) -> np.ndarray:
        if self.kind == "encoder":
            raise self._no_logits()
        if self.llm.n_tokens == 0:
            raise ConvcoreError("decode() before logits(): nothing to continue")
        return self._eval(self.check_ids(token_ids))

    def close(self) -> None:
        for attr in ("llm", "_per_token"):
            llm = getattr(self, attr, None)
            setattr(self, attr, None)
            if llm is not None:
                llm.close()
