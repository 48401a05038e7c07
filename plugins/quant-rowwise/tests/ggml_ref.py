"""llama.cpp's own C quantizer, for tests and benchmarks: ``ggml_quantize_chunk`` from the
libggml that llama-cpp-python ships, called through ctypes.

``quantize(name, x, imatrix)`` gives ggml's blocks for an f32 matrix (rows of
``x.shape[-1]``) with or without an importance vector; ``weighted_error`` is the
importance-weighted squared error the tests compare (what llama.cpp's searches minimise).
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path

import numpy as np


@functools.cache
def library() -> ctypes.CDLL | None:
    """libggml-base from llama-cpp-python, or None when it is not installed."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib_dir = Path(spec.submodule_search_locations[0]) / "lib"
    for candidate in sorted(lib_dir.glob("libggml-base.so*")) + sorted(lib_dir.glob("libggml-base.dylib")):
        lib = ctypes.CDLL(str(candidate))
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
            ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        return lib
    return None


def ggml_type(name: str) -> int:
    import gguf

    return int(gguf.GGMLQuantizationType[name.upper()])


def quantize(name: str, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """ggml's blocks (uint8, shape ``(rows, row_bytes)``) for the f32 rows of ``x``."""
    import gguf

    lib = library()
    if lib is None:
        raise RuntimeError("llama-cpp-python's libggml-base is not installed")
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    rows, n = x.shape
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name.upper()]]
    out = np.zeros((rows, n // block * size), np.uint8)
    qw = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        assert imatrix.shape == (n,)
        qw = imatrix.ctypes.data
    written = lib.ggml_quantize_chunk(ggml_type(name), x.ctypes.data, out.ctypes.data, 0, rows, n, qw)
    assert written == out.size, (written, out.size)
    return out


def dequantize(name: str, blocks: np.ndarray, n: int) -> np.ndarray:
    """gguf-py's float32 values of ``blocks`` (rows of ``n`` values)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[name.upper()]
    return gguf.quants.dequantize(np.ascontiguousarray(blocks).reshape(-1, blocks.shape[-1]), qtype).reshape(-1, n)


def weighted_error(x: np.ndarray, y: np.ndarray, imatrix: np.ndarray | None) -> float:
    """sum over rows and columns of importance[j] * (x - y)**2 (importance 1 when None)."""
    d = (np.asarray(x, np.float64).reshape(y.shape) - y) ** 2
    if imatrix is not None:
        d = d * np.asarray(imatrix, np.float64)
    return float(d.sum())


# what the IQ kernel tests share ---------------------------------------------------------
def needs_ggml() -> None:
    """Skip the calling test when llama-cpp-python's libggml-base is not installed."""
    import pytest

    pytest.importorskip("llama_cpp")
    if library() is None:
        pytest.skip("llama-cpp-python's libggml-base is not installed")


def weights_like_a_model(rows: int, cols: int, seed: int) -> np.ndarray:
    """Rows of student-t (df 5) values: mostly normal, a few outliers."""
    rng = np.random.default_rng(seed)
    return (rng.standard_t(5, (rows, cols)) * 0.02).astype(np.float32)


def importance(cols: int, seed: int) -> np.ndarray:
    """An importance vector that varies across columns by orders of magnitude."""
    return np.exp(np.random.default_rng(seed + 100).standard_normal(cols) * 2).astype(np.float32)


def compare(quantize_fn, name: str, x: np.ndarray, imatrix: np.ndarray | None) -> tuple[float, float, int]:
    """(our weighted error, ggml's, rows whose bytes equal ggml's) for the f32 matrix ``x``,
    ours made by ``quantize_fn(name, x, imatrix)``."""
    ours = quantize_fn(name, x, imatrix)
    theirs = quantize(name, x, imatrix)
    cols = x.shape[-1]
    e_ours = weighted_error(x, dequantize(name, ours, cols), imatrix)
    e_theirs = weighted_error(x, dequantize(name, theirs, cols), imatrix)
    same = int((ours.reshape(theirs.shape) == theirs).all(axis=1).sum())
    return e_ours, e_theirs, same
