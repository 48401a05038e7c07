"""Reading kernel input: any float array as float32 rows, a bounded slice at a time."""
from __future__ import annotations

from typing import Iterator

import numpy as np
from convcore import page_releaser

CHUNK_ELEMENTS = 1 << 22  # 16 MB of f32 per slice


def as_rows(array: np.ndarray, block: int) -> np.ndarray:
    """``array`` as a C-contiguous 2-D (rows, row_length) view; checks the block fit."""
    if array.ndim == 0:
        raise ValueError("cannot quantize a scalar")
    if array.shape[-1] % block:
        raise ValueError(f"row length {array.shape[-1]} is not a multiple of the block size {block}")
    return np.ascontiguousarray(array).reshape(-1, array.shape[-1])


def f32_slices(rows: np.ndarray, chunk: int = CHUNK_ELEMENTS) -> Iterator[tuple[int, np.ndarray]]:
    """(first_row, float32 rows) slices of ``rows``. f32 input is passed through without a
    copy; f16/bf16 are widened one slice at a time, so no full f32 copy of a large tensor
    is made. Kernels check for NaN and Inf as they read."""
    step = max(1, chunk // max(1, rows.shape[1]))
    wide = None
    # a slice of a read-only file map (a safetensors source) leaves the resident set once
    # the kernel has read it: quantizing a large tensor holds a slice of it, not all
    release = page_releaser(rows)
    for start in range(0, rows.shape[0], step):
        part = rows[start:start + step]
        if part.dtype == np.float32:
            pass
        elif str(part.dtype) == "bfloat16":
            # bf16 is the top half of an f32: a 16-bit shift widens it exactly, 8x faster
            # than ml_dtypes' astype; one buffer serves every slice (each is consumed
            # before the next is made)
            if wide is None:
                wide = np.empty(min(rows.shape[0], step) * rows.shape[1], np.uint32)
            bits = wide[:part.size].reshape(part.shape)
            np.left_shift(part.view(np.uint16), np.uint32(16), out=bits, dtype=np.uint32)
            part = bits.view(np.float32)
        elif part.dtype.kind == "f":
            part = part.astype(np.float32)
        else:
            raise ValueError(f"expects f32, f16 or bf16 input, not {part.dtype}")
        yield start, part
        release(rows[start:start + step])


def faulted_empty(shape, dtype) -> np.ndarray:
    """``np.empty`` with its pages already mapped in, for kernel outputs. Page faults
    taken inside a parallel quantization kernel cost far more than the kernel's own
    work, and one thread touching one byte per page first costs little (figures in
    docs/benchmarks.md)."""
    out = np.empty(shape, dtype)
    if out.nbytes >= 1 << 20:
        out.reshape(-1).view(np.uint8)[::4096] = 0
    return out
