"""Cast-and-transpose of weight matrices for MatMul initializers, as Numba kernels.

``numpy.ascontiguousarray(w.T)`` walks one side of a large matrix with a stride of a
whole row and ml_dtypes' bf16 -> f32 ``astype`` goes element by element through Python's
float machinery: together they were 85% of an f32 build. Here the matrix is moved in
64 x 64 tiles on every core, bf16 widened by a bit shift (exact) on the way, and other
casts done once, tile-free, by numpy before the bit-moving transpose.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from convcore import cast, dtype_name, numpy_dtype

TILE = 64


@njit(parallel=True, cache=True, nogil=True)
def _transpose_bits(src, out, col0, shift):  # pragma: no cover - compiled
    """out[j, col0 + i] = src[i, j] << shift, moved in tiles: a bit-for-bit transpose
    (shift 0; u16 or u32 views), or bf16 -> f32 widening on the way (u16 in, u32 out,
    shift 16: exact)."""
    n, k = src.shape
    tiles = (k + TILE - 1) // TILE
    for t in prange(tiles):
        k0 = t * TILE
        k1 = min(k, k0 + TILE)
        for n0 in range(0, n, TILE):
            n1 = min(n, n0 + TILE)
            for j in range(k0, k1):
                for i in range(n0, n1):
                    out[j, col0 + i] = np.uint32(src[i, j]) << shift


BITS = {2: np.uint16, 4: np.uint32}


def transposed(parts: list[np.ndarray], dtype: str) -> np.ndarray:
    """``concatenate(parts, axis=0).T`` cast to ``dtype``, C-contiguous, without the
    concatenated or cast intermediates of the whole matrix."""
    k = parts[0].shape[1]
    n = sum(p.shape[0] for p in parts)
    target = numpy_dtype(dtype)
    out = np.empty((k, n), dtype=target)
    out_bits = out.view(BITS[target.itemsize])
    col = 0
    for part in parts:
        src = dtype_name(part.dtype)
        if src == "bf16" and dtype == "f32":
            _transpose_bits(np.ascontiguousarray(part).view(np.uint16), out_bits, col, np.uint32(16))
        else:
            same = np.ascontiguousarray(cast(part, dtype))
            _transpose_bits(same.view(BITS[target.itemsize]), out_bits, col, np.uint32(0))
        col += part.shape[0]
    return out
