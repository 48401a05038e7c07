"""GGUF IQ1_S (50 bytes per 256 values) and IQ1_M (56 bytes): the kernel module that
iquants.py runs for these two types.

Quantizing follows llama.cpp's ``quantize_iq1_s`` / ``quantize_iq1_m`` (with the
importance of each column, which both need), block by block in Numba kernels on
threads: iq1_s.py and iq1_m.py hold the block searches, iq1_search.py what they share,
iq1_tables.py the grid and its neighbour lists, iq1_dequant.py the way back. Input is
read as raw f32/f16/bf16 bits and widened one block at a time, never copied to f32.

The kernels repeat ggml's float32 arithmetic in its order, so the blocks equal ggml's
byte for byte (on every matrix the tests and benchmarks tried). One deliberate
difference: a super-scale too large for f16 (values around 1e6 and up) is clamped to
65504 where ggml stores inf, so such a block decodes to finite values.
"""
from __future__ import annotations

import functools

import numpy as np

from ._input import faulted_empty
from ._qk import QK_K
from ._threads import run_split
from .iquants import IQ_TYPES, IQuantError


@functools.cache
def _tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(grid int8, codes uint8 = grid + 1, kmap, nbrs): iq1_tables' tables as the kernels
    take them."""
    from .iq1_tables import tables

    grid, kmap, nbrs = tables()
    return grid, np.ascontiguousarray(grid + 1, dtype=np.uint8), kmap, nbrs


def _kernel(name: str):
    if name == "iq1_s":
        from .iq1_s import rows_iq1s
        return rows_iq1s
    if name == "iq1_m":
        from .iq1_m import rows_iq1m
        return rows_iq1m
    raise IQuantError(f"iq1 kernels do not make {name}")


def quantize(name: str, array: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """``name`` blocks (uint8, shape ``(*array.shape[:-1], row_bytes)``) of the f32, f16 or
    bf16 ``array``, with ``weights`` the float32 importance of each column.

    :raises IQuantError: on missing or non-finite weights, or NaN/Inf in ``array``.
    """
    from .kquants import _bits_2d

    kernel = _kernel(name)
    if weights is None:
        raise IQuantError(f"{name} needs an importance matrix")
    shape = np.shape(array)
    w = np.array(weights, dtype=np.float32)  # a small writable copy: one kernel signature
    if w.shape != (shape[-1],):
        raise IQuantError(f"{name}: importance of shape {w.shape} for rows of {shape[-1]} values")
    if not np.isfinite(w).all():
        raise IQuantError(f"{name}: the importance holds NaN or Inf")
    bits, mode, lut = _bits_2d(array, name)
    nb = shape[-1] // QK_K
    size = IQ_TYPES[name][1]
    out = faulted_empty((bits.shape[0], nb * size), np.uint8)
    total = bits.shape[0] * nb
    if total:
        _, codes, kmap, nbrs = _tables()
        bad = run_split(kernel, (bits, mode, lut, w, codes, kmap, nbrs, out), total)
        if bad:
            raise IQuantError(f"{name}: NaN or Inf in input ({bad} of {total} blocks)")
    return out.reshape(*shape[:-1], nb * size)


def dequantize(name: str, blocks: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """float32 values (shape ``shape``) of the ``name`` blocks ``blocks`` (uint8, one row
    of blocks per row of values), equal to gguf.quants.dequantize."""
    from . import iq1_dequant
    from .kquants import _F16_LUT

    shape = tuple(int(s) for s in shape)
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    nb = shape[-1] // QK_K
    blocks = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(rows, nb * IQ_TYPES[name][1])
    blocks.flags.writeable = False  # a new view, read-only whatever the input: one signature
    kernel = {"iq1_s": iq1_dequant.deq_iq1s, "iq1_m": iq1_dequant.deq_iq1m}[name]
    out = np.empty((rows, shape[-1]), np.float32)
    if rows and nb:
        grid = _tables()[0]
        run_split(kernel, (blocks, grid, _F16_LUT, out), rows * nb,
                  runs=min(256, max(1, rows * nb // 256)))
    return out.reshape(shape)
