"""Logits from llama-cpp-python (the ``[infer]`` extra)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from convcore import ConvcoreError

from .checks import read_header

GGML_TYPE_F32 = 0


def logits(path: Path, token_ids: list[int]) -> np.ndarray:
    """float32 logits (len(token_ids), vocab) from llama.cpp, KV cache in f32 so the only
    rounding is the model's own."""
    try:
        import llama_cpp
    except ImportError:
        raise ConvcoreError("gguf inference needs llama-cpp-python "
                            "(pip install 'conv-gguf[infer]')") from None
    read_header(Path(path))   # a bad file gives one line, not a crash inside llama.cpp
    if not token_ids:
        raise ConvcoreError("gguf inference needs at least one token")
    try:
        llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=max(64, len(token_ids)),
                              n_batch=max(64, len(token_ids)), verbose=False,
                              type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    except ValueError as exc:
        raise ConvcoreError(f"{path}: llama.cpp cannot load it ({exc})") from None
    n_vocab = llm.n_vocab()
    bad = [t for t in token_ids if not 0 <= t < n_vocab]
    if bad:
        raise ConvcoreError(f"token id {bad[0]} is outside the vocabulary of {n_vocab}")
    llm.eval(list(token_ids))
    out = np.array(llm.scores[:len(token_ids)], dtype=np.float32)
    llm.close()
    return out
