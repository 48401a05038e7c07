"""The IQ1_S and IQ1_M dequantizers: ggml's block bytes back to float32, equal bit for bit
to gguf.quants.dequantize (each value is one float32 product, dl * (grid + delta), with
dl = d * (2s + 1) rounded to float32 first, as gguf-py and ggml compute it).

The f16 super-scale is widened through a table of f16 bits -> f32 bits (numpy's own
conversion), so even a NaN's payload comes out as gguf-py's.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from . import _cache  # noqa: F401  (the kernel cache, before any @njit here)
from ._bits import f32_from_bits
from ._qk import QK_K
from .iq1_search import DELTA


@njit(nogil=True, cache=True)
def _group(y, c, grid, g, dl, delta):
    """The 8 values of grid point g under scale dl and shift delta into y[c:c+8]."""
    for j in range(8):
        y[c + j] = dl * (np.float32(grid[g, j]) + delta)


@njit(nogil=True, cache=True)
def deq_iq1s(blocks, grid, lut, out, start, end):
    """IQ1_S blocks start..end-1 (row-major over (rows, blocks per row)) of ``blocks``
    (uint8 rows of 50-byte blocks) into the float32 rows ``out``; grid int8 (2048, 8),
    lut the f16 -> f32 bits table."""
    nb = out.shape[1] // QK_K
    for blk in range(start, end):
        r = blk // nb
        b = blk - r * nb
        q = blocks[r, 50 * b:50 * (b + 1)]
        y = out[r, QK_K * b:QK_K * (b + 1)]
        d = f32_from_bits(lut[np.int32(q[0]) | (np.int32(q[1]) << 8)])
        for ib in range(8):
            qh = np.int32(q[34 + 2 * ib]) | (np.int32(q[35 + 2 * ib]) << 8)
            dl = d * np.float32(2 * ((qh >> 12) & 7) + 1)
            delta = -DELTA if qh & 0x8000 else DELTA
            for k in range(4):
                g = np.int32(q[2 + 4 * ib + k]) | (((qh >> (3 * k)) & 7) << 8)
                _group(y, 32 * ib + 8 * k, grid, g, dl, delta)
    return 0


@njit(nogil=True, cache=True)
def deq_iq1m(blocks, grid, lut, out, start, end):
    """IQ1_M blocks start..end-1 of ``blocks`` (uint8 rows of 56-byte blocks) into the
    float32 rows ``out``; as deq_iq1s."""
    nb = out.shape[1] // QK_K
    for blk in range(start, end):
        r = blk // nb
        b = blk - r * nb
        q = blocks[r, 56 * b:56 * (b + 1)]
        y = out[r, QK_K * b:QK_K * (b + 1)]
        dh = 0
        for j in range(4):
            dh |= (np.int32(q[49 + 2 * j]) >> 4) << (4 * j)
        d = f32_from_bits(lut[dh])
        for ib in range(16):
            w = np.int32(q[48 + 2 * (ib // 4)]) | (np.int32(q[49 + 2 * (ib // 4)]) << 8)
            s = (w >> (3 * (ib % 4))) & 7
            dl = d * np.float32(2 * s + 1)
            qh = np.int32(q[32 + ib])
            for h in range(2):
                g = np.int32(q[2 * ib + h]) | (((qh >> (4 * h)) & 7) << 8)
                delta = -DELTA if (qh >> (4 * h)) & 0x08 else DELTA
                _group(y, 16 * ib + 8 * h, grid, g, dl, delta)
    return 0
