"""Decoding IQ3_XXS and IQ3_S blocks to float32, with gguf-py's float32 operations in its
order (scale, then times the grid value, then the sign), so the values are its values bit
for bit. Block layouts: iq3_pack.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from . import _cache  # noqa: F401  (the kernel cache, before any @njit here)
from .kquant_bits import get_f16
from ._qk import QK_K

_HALF = np.float32(0.5)
_PLUS = np.float32(1.0)
_MINUS = np.float32(-1.0)


@njit(nogil=True, cache=True)
def _parity(v):
    v ^= v >> 4
    v ^= v >> 2
    v ^= v >> 1
    return v & 1


@njit(nogil=True, cache=True)
def deq_iq3(blocks, xxs, values, out, start, end):
    """Blocks start..end-1 of the uint8 rows ``blocks`` (IQ3_XXS when ``xxs``, else IQ3_S)
    into the float32 rows ``out``; ``values`` float32 (points, 4) is the type's grid.
    Returns 0 (run_split sums what its calls return)."""
    nb = out.shape[1] // QK_K
    ts = 98 if xxs else 110
    for blk in range(start, end):
        r = blk // nb
        b = blk - r * nb
        q = blocks[r, b * ts:(b + 1) * ts]
        y = out[r, b * QK_K:(b + 1) * QK_K]
        d = get_f16(q, 0)
        for ib in range(8):
            word = np.uint32(0)
            if xxs:
                word = (np.uint32(q[66 + 4 * ib]) | (np.uint32(q[67 + 4 * ib]) << np.uint32(8))
                        | (np.uint32(q[68 + 4 * ib]) << np.uint32(16))
                        | (np.uint32(q[69 + 4 * ib]) << np.uint32(24)))
                db = d * (_HALF + np.float32(word >> np.uint32(28))) * _HALF
            else:
                nib = (q[106 + ib // 2] >> (4 * (ib % 2))) & 15
                db = d * np.float32(1 + 2 * nib)
            for k in range(8):
                if xxs:
                    g = np.int64(q[2 + 8 * ib + k])
                    s7 = np.int64((word >> np.uint32(7 * (k // 2))) & np.uint32(127))
                    sbyte = s7 | (_parity(s7) << 7)
                    sbits = sbyte >> (4 * (k % 2))
                else:
                    g = np.int64(q[2 + 8 * ib + k]) | (((np.int64(q[66 + ib]) >> k) & 1) << 8)
                    sbits = np.int64(q[74 + 4 * ib + k // 2]) >> (4 * (k % 2))
                for i in range(4):
                    sign = _MINUS if (sbits >> i) & 1 else _PLUS
                    y[32 * ib + 4 * k + i] = db * values[g, i] * sign
    return 0
