"""The k-quant dequantizers: ggml's block bytes back to float32, as gguf.quants does."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .kquant_bits import get_f16
from .kquants import QK_K


@njit(nogil=True, cache=True, inline="always")
def _scale_min_k4(q, o, j):
    """Sub-block j's 6-bit (scale, min) from the 12 packed bytes at q[o:o+12] (q4_K, q5_K)."""
    if j < 4:
        return q[o + j] & 63, q[o + j + 4] & 63
    return ((q[o + j + 4] & 0xF) | ((q[o + j - 4] >> 6) << 4),
            (q[o + j + 4] >> 4) | ((q[o + j] >> 6) << 4))


@njit(nogil=True, cache=True, parallel=True)
def dequantize_rows(blocks, kind, out):
    """float32 values of the k-quant blocks (rows, blocks per row * type size) into ``out``
    (rows, blocks per row * 256); kind 2..6 for q2_K..q6_K. The inverse of quantize_rows;
    the float32 arithmetic follows gguf.quants op for op, so the values are equal."""
    nrows = out.shape[0]
    nb = out.shape[1] // QK_K
    ts = blocks.shape[1] // max(nb, 1)
    total = nrows * nb
    for blk in prange(total):
        r = blk // nb
        b = blk - r * nb
        q = blocks[r, b * ts:(b + 1) * ts]
        y = out[r, b * QK_K:(b + 1) * QK_K]
        if kind == 4 or kind == 5:
            d = get_f16(q, 0)
            dmin = get_f16(q, 2)
            qs = 16 if kind == 4 else 48
            for j in range(8):
                s, m = _scale_min_k4(q, 4, j)
                dl = d * np.float32(s)
                ml = dmin * np.float32(m)
                c = j // 2
                sh = 4 * (j % 2)
                for l in range(32):
                    v = (q[qs + 32 * c + l] >> sh) & 0xF
                    if kind == 5:
                        v |= ((q[16 + l] >> j) & 1) << 4
                    y[32 * j + l] = dl * np.float32(v) - ml
        elif kind == 6:
            d = get_f16(q, 208)
            for e in range(QK_K):
                h = e // 128
                r2 = e % 128
                lo = (q[64 * h + r2 % 64] >> (4 * (r2 // 64))) & 0xF
                hi = (q[128 + 32 * h + r2 % 32] >> (2 * (r2 // 32))) & 3
                sv = np.int32(q[192 + e // 16])
                if sv > 127:
                    sv -= 256
                dl = d * np.float32(sv)
                y[e] = dl * np.float32(np.int32(lo | (hi << 4)) - 32)
        elif kind == 3:
            d = get_f16(q, 108)
            for j in range(16):
                lo = (q[96 + j % 8] >> (4 * (j // 8))) & 0xF
                hi = (q[104 + j % 4] >> (2 * (j // 4))) & 3
                dl = d * np.float32(np.int32(lo | (hi << 4)) - 32)
                for l in range(16):
                    e = 16 * j + l
                    h = e // 128
                    r2 = e % 128
                    ql = (q[32 + 32 * h + r2 % 32] >> (2 * (r2 // 32))) & 3
                    hb = (q[e % 32] >> (e // 32)) & 1
                    y[e] = dl * np.float32(np.int32(ql) - 4 * (1 - np.int32(hb)))
        else:
            d = get_f16(q, 80)
            dmin = get_f16(q, 82)
            for j in range(16):
                dl = d * np.float32(q[j] & 0xF)
                ml = dmin * np.float32(q[j] >> 4)
                for l in range(16):
                    e = 16 * j + l
                    h = e // 128
                    r2 = e % 128
                    v = (q[16 + 32 * h + r2 % 32] >> (2 * (r2 // 32))) & 3
                    y[e] = dl * np.float32(v) - ml
