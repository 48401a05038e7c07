"""The IQ3 block packers (one 256-weight block into ggml's bytes: eight sub-block searches,
the f16 super-scale, 4-bit sub-scales, grid rows, signs) and the row driver that runs
one of them over a run of blocks, reading the input's raw bits.

IQ3_XXS, 98 bytes: d (f16), 64 grid rows (one byte each, 8 per sub-block), then per
sub-block a little-endian uint32 of four 7-bit sign groups and the 4-bit scale on top.
IQ3_S, 110 bytes: d (f16), the low 8 bits of 64 grid rows, their 9th bits (one byte per
sub-block), 32 bytes of signs, four bytes of two 4-bit scales each.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from . import _cache  # noqa: F401  (the kernel cache, before any @njit here)
from .iq3_search import F0, F1, HALF, search32
from .kquant_bits import f32_to_f16, load_block, nearest, put_f16
from ._qk import QK_K

TYPE_SIZE = {"iq3_xxs": 98, "iq3_s": 110}
# llama.cpp stores d a little above max_scale / 31 ("a small improvement via this fudge")
FUDGE_XXS = np.float32(1.0125)
FUDGE_S = np.float32(1.033)


@njit(nogil=True, cache=True)
def _sub_scale(inv_d, scale):
    """The 4-bit code l of a sub-block scale, decoded as d (2l + 1)."""
    return min(15, max(0, nearest(HALF * (inv_d * scale - F1))))


@njit(nogil=True, cache=True)
def _sumx2(x):
    s = F0
    for i in range(QK_K):
        s += x[i] * x[i]
    return s


@njit(nogil=True, cache=True)
def block_iq3(x, qw, c0, has_w, xxs, gridq, levels, kmap, nbr, out, sc, S):
    """One IQ3_XXS (``xxs``) or IQ3_S block of the 256 float32 weights x into out[0:98|110];
    qw[c0:c0+256] their importance when ``has_w``. Scratch: sc float32[8] sub-block
    scales; S, the search's arrays (see rows_iq3)."""
    weight, waux, xval, L, Laux, on, on_aux, signs = S
    size = 98 if xxs else 110
    for i in range(size):
        out[i] = 0
    sigma2 = np.float32(2.0) * _sumx2(x) / np.float32(QK_K)
    max_scale = F0
    for ib in range(8):
        r = search32(x, 32 * ib, qw, c0 + 32 * ib, has_w, sigma2, xxs, gridq, levels, kmap,
                     nbr, weight, waux, xval, L, Laux, on, on_aux, signs)
        if r < 0:
            sc[ib] = F0
            continue
        scale = np.float32(r)
        for k in range(8):
            u = 0
            for i in range(4):
                u |= L[4 * k + i] << (3 * i)
            g = max(0, kmap[u])  # always a grid row: the search ends on the grid
            out[2 + 8 * ib + k] = g & 255
            if not xxs:
                out[66 + ib] |= (g >> 8) << k
        if xxs:
            word = signs[0] | (signs[1] << 7) | (signs[2] << 14) | (signs[3] << 21)
            for j in range(4):
                out[66 + 4 * ib + j] = (word >> (8 * j)) & 255
        else:
            for j in range(4):
                out[74 + 4 * ib + j] = signs[j]
        sc[ib] = scale
        if scale > max_scale:
            max_scale = scale
    if max_scale == F0:
        for i in range(size):
            out[i] = 0
        return
    d = max_scale / np.float32(31.0)
    put_f16(out, 0, f32_to_f16(d * (FUDGE_XXS if xxs else FUDGE_S)))
    inv_d = F1 / d
    for ib in range(8):
        l = _sub_scale(inv_d, sc[ib])
        if xxs:
            out[66 + 4 * ib + 3] |= l << 4  # bits 28..31 of the sub-block's word
        else:
            out[106 + ib // 2] |= l << (4 * (ib % 2))


@njit(nogil=True, cache=True)
def rows_iq3(x, mode, lut, qw, has_w, xxs, gridq, levels, kmap, nbr, out, start, end):
    """IQ3 blocks start..end-1 (block b of row r is number r * blocks_per_row + b); returns
    how many held NaN or Inf (those are left unwritten).

    x: the input's raw bits as uint16 rows, mode/lut as kquant_bits.load_block reads them;
    qw: float32 importance per column (``has_w``) or a placeholder; gridq, levels, kmap,
    nbr: iq3_tables.Tables of the type; out: uint8 rows of blocks.
    """
    nb = (x.shape[1] // 2 if mode == 0 else x.shape[1]) // QK_K
    ts = out.shape[1] // nb
    ubuf = np.empty(QK_K, np.uint32)
    xb = ubuf.view(np.float32)
    sc = np.empty(8, np.float32)
    S = (np.empty(32, np.float32), np.empty(32, np.float32), np.empty(32, np.float32),
         np.empty(32, np.int32), np.empty(32, np.int32), np.empty(8, np.bool_),
         np.empty(8, np.bool_), np.empty(4, np.int32))
    bad = 0
    for blk in range(start, end):
        r = blk // nb
        b = blk - r * nb
        if not load_block(x, r, b * QK_K, mode, lut, ubuf):
            bad += 1
            continue
        block_iq3(xb, qw, b * QK_K, has_w, xxs, gridq, levels, kmap, nbr,
                  out[r, b * ts:(b + 1) * ts], sc, S)
    return bad
