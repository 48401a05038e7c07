"""Helpers shared by conv-gguf's test modules (imported by path: see conftest.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

TEXT = "The quick brown fox jumps over the lazy dog. Hello world, 12345!"
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """max|got - ref| / max|ref| (the error measure every test here uses)."""
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def llama_tokenize(path: Path, text: str = TEXT) -> list[int]:
    import llama_cpp
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    ids = llm.tokenize(text.encode(), add_bos=True, special=True)  # parse <s> etc. as HF does
    llm.close()
    return ids
