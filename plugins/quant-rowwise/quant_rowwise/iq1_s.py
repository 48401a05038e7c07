"""The IQ1_S block kernel and its row driver.

An IQ1_S block (50 bytes, 256 values) is an f16 super-scale d, then 8 groups of 32
values, each four grid points (8 low index bits in qs, 3 high ones in qh) with one 3-bit
scale s (value d * (2s + 1)) and a shift bit (values moved by -DELTA when set, else
+DELTA) in the top nibble of the group's qh word.

The search is llama.cpp's: for each group of 32, the exact weighted least-squares
split of its sorted values into three code classes, for either shift (prefix sums over
the sorted values, every pair of boundaries), then each 8-value pattern snapped to the
grid (or to its best neighbour, after which the group's scale is refitted); the group
scales are finally rounded to 3 bits under d = max scale / 15 (stored times 1.125).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from . import _cache  # noqa: F401  (the kernel cache, before any @njit here)
from ._qk import QK_K
from .iq1_search import F0, F1, FLT_MAX, QV, grid_point, sort_order
from .kquant_bits import f32_to_f16, load_block, nearest, put_f16

BLOCK_BYTES = 50
GROUP = 32
EPS = np.float32(1e-12)  # GROUP_MAX_EPS_IQ1_S
F2 = np.float32(2.0)
F05 = np.float32(0.5)
F15 = np.float32(15.0)
FQK = np.float32(QK_K)
D_FUDGE = np.float32(1.125)


@njit(nogil=True, cache=True)
def _split(sumx, sumw):
    """The best boundaries of a group's three code classes from the prefix sums sumx
    (weight * value) and sumw (weight) over its sorted values: (scale, i1, i2, shift),
    i1 -1 when no split has a positive sum of q^2. As ggml: every i1 <= i2, shift +1
    then -1, a candidate kept when sqx^2 > best * sq2 (best = scale * sqx of the last
    kept), each sum in ggml's order."""
    p0, p1, p2 = QV[1, 0], QV[1, 1], QV[1, 2]
    m0, m1, m2 = QV[0, 0], QV[0, 1], QV[0, 2]
    tx = sumx[GROUP]
    tw = sumw[GROUP]
    best = -FLT_MAX
    scale = F0
    b1 = -1
    b2 = -1
    shift = 0
    for i1 in range(GROUP + 1):
        x1 = sumx[i1]
        w1 = sumw[i1]
        for i2 in range(i1, GROUP + 1):
            x12 = sumx[i2] - x1
            x2 = tx - sumx[i2]
            w12 = sumw[i2] - w1
            w2 = tw - sumw[i2]
            sqx = x1 * p0 + x12 * p1 + x2 * p2
            sq2 = w1 * p0 * p0 + w12 * p1 * p1 + w2 * p2 * p2
            if sq2 > F0 and sqx * sqx > best * sq2:
                scale = sqx / sq2
                best = scale * sqx
                b1 = i1
                b2 = i2
                shift = 1
            sqx = x1 * m0 + x12 * m1 + x2 * m2
            sq2 = w1 * m0 * m0 + w12 * m1 * m1 + w2 * m2 * m2
            if sq2 > F0 and sqx * sqx > best * sq2:
                scale = sqx / sq2
                best = scale * sqx
                b1 = i1
                b2 = i2
                shift = -1
    return scale, b1, b2, shift


@njit(nogil=True, cache=True)
def block_iq1s(xb, qw, codes, kmap, nbrs, out, weight, idx, sumx, sumw, L, index, scales, shifts,
               qh, terms):
    """One IQ1_S block: the 256 values xb, their column importances qw, into out[0:50].

    Scratch, each written here before it is read: weight float32[32] (importance times
    sqrt(sigma2 + x^2) of the group), idx int32[32] (its sorted order), sumx / sumw
    float32[33] (prefix sums over that order), L int32[32] (codes), index int32[4]
    (grid points), scales float32[8] / shifts int32[8] (per group), qh int32[8], terms
    float32[24] (grid_point's).
    """
    for i in range(BLOCK_BYTES):
        out[i] = 0
    sumx2 = F0
    for i in range(QK_K):
        sumx2 += xb[i] * xb[i]
    sigma2 = F2 * sumx2 / FQK
    max_scale = F0
    for ib in range(QK_K // GROUP):
        o = GROUP * ib
        qh[ib] = 0
        for i in range(GROUP):
            weight[i] = qw[o + i] * np.sqrt(sigma2 + xb[o + i] * xb[o + i])
        amax = abs(xb[o])
        for i in range(1, GROUP):
            a = abs(xb[o + i])
            amax = amax if amax > a else a
        scales[ib] = F0
        shifts[ib] = 1
        if amax < EPS:
            continue
        sort_order(xb, o, GROUP, idx)
        sumx[0] = F0
        sumw[0] = F0
        for j in range(GROUP):
            i = idx[j]
            sumx[j + 1] = sumx[j] + weight[i] * xb[o + i]
            sumw[j + 1] = sumw[j] + weight[i]
        scale, b1, b2, shift = _split(sumx, sumw)
        if b1 < 0 or b2 < 0 or shift == 0:
            continue
        for j in range(GROUP):
            L[idx[j]] = 0 if j < b1 else (1 if j < b2 else 2)
        if scale < F0:
            for j in range(GROUP):
                L[j] = 2 - L[j]
            scale = -scale
            shift = -shift
        qv = QV[1] if shift == 1 else QV[0]
        on_grid = True
        for k in range(GROUP // 8):
            g, hit = grid_point(L, 8 * k, codes, kmap, nbrs, xb, o + 8 * k, weight, 8 * k,
                                scale, qv, terms)
            index[k] = g
            on_grid = on_grid and hit
        if not on_grid:
            sqx = F0
            sq2 = F0
            for k in range(GROUP // 8):
                for j in range(8):
                    w = weight[8 * k + j]
                    q = qv[codes[index[k], j]]
                    sqx += w * q * xb[o + 8 * k + j]
                    sq2 += w * q * q
            if sqx > F0 and sq2 > F0:
                scale = sqx / sq2
        h = 0
        for k in range(GROUP // 8):
            out[2 + 4 * ib + k] = index[k] & 255
            h |= (index[k] >> 8) << (3 * k)
        qh[ib] = h
        scales[ib] = scale
        shifts[ib] = shift
        max_scale = max_scale if max_scale > scale else scale
    if max_scale != F0:
        d = max_scale / F15
        put_f16(out, 0, f32_to_f16(d * D_FUDGE))
        inv = F1 / d
        for ib in range(QK_K // GROUP):
            s = max(0, min(7, nearest(F05 * (inv * scales[ib] - F1))))
            if shifts[ib] == -1:
                s |= 8
            qh[ib] |= s << 12
    for ib in range(QK_K // GROUP):
        out[34 + 2 * ib] = qh[ib] & 255
        out[35 + 2 * ib] = qh[ib] >> 8


@njit(nogil=True, cache=True)
def rows_iq1s(x, mode, lut, qw, codes, kmap, nbrs, out, start, end):
    """IQ1_S blocks start..end-1 (row-major over (rows, blocks per row)) of the raw input
    bits x (kquant_bits.load_block's modes) with column importances qw, into the uint8
    rows ``out``. Returns how many blocks held NaN or Inf (those are left unwritten)."""
    nb = (x.shape[1] // 2 if mode == 0 else x.shape[1]) // QK_K
    ubuf = np.empty(QK_K, np.uint32)
    xb = ubuf.view(np.float32)
    weight = np.empty(GROUP, np.float32)
    idx = np.empty(GROUP, np.int32)
    sumx = np.empty(GROUP + 1, np.float32)
    sumw = np.empty(GROUP + 1, np.float32)
    L = np.empty(GROUP, np.int32)
    index = np.empty(GROUP // 8, np.int32)
    scales = np.empty(QK_K // GROUP, np.float32)
    shifts = np.empty(QK_K // GROUP, np.int32)
    qh = np.empty(QK_K // GROUP, np.int32)
    terms = np.empty(24, np.float32)
    bad = 0
    for blk in range(start, end):
        r = blk // nb
        b = blk - r * nb
        if not load_block(x, r, b * QK_K, mode, lut, ubuf):
            bad += 1
            continue
        block_iq1s(xb, qw[b * QK_K:(b + 1) * QK_K], codes, kmap, nbrs,
                   out[r, b * BLOCK_BYTES:(b + 1) * BLOCK_BYTES], weight, idx, sumx, sumw, L,
                   index, scales, shifts, qh, terms)
    return bad
