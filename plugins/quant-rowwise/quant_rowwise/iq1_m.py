"""The IQ1_M block kernel and its row driver.

An IQ1_M block (56 bytes, 256 values) has no f16 field of its own: qs[32] (8 low index
bits of each grid point), qh[16] (per group of 16 values, two nibbles: 3 high index bits
and a shift bit for each of its two grid points) and four little-endian uint16 words of
scales, each holding the 3-bit scales of four groups in bits 0..11 and one nibble of
the block's f16 super-scale d in bits 12..15. Value = d * (2s + 1) * (grid + delta),
delta -DELTA where the point's shift bit is set, else +DELTA.

The search is llama.cpp's: for each group of 16, the exact weighted least-squares
split into three code classes with a shift chosen per half (four combinations, prefix
sums kept per half), the grid snap with refit as in IQ1_S, 3-bit scales under
max scale / 15, and then d refitted by least squares over the whole block (stored
times 1.1125).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from . import _cache  # noqa: F401  (the kernel cache, before any @njit here)
from ._qk import QK_K
from .iq1_search import F0, F1, FLT_MAX, QV, grid_point, sort_order
from .kquant_bits import f32_to_f16, load_block, nearest

BLOCK_BYTES = 56
GROUP = 16
HALF = GROUP // 2
EPS = np.float32(1e-7)  # GROUP_MAX_EPS_IQ1_M
F2 = np.float32(2.0)
F05 = np.float32(0.5)
F15 = np.float32(15.0)
FQK = np.float32(QK_K)
D_FUDGE = np.float32(1.1125)
# qh bits of a group's two shifts, by shift combination k: bit 1 of k is the first half's
# shift (set: -DELTA), bit 0 the second's
SHIFT_BITS = np.array([0x00, 0x80, 0x08, 0x88], np.int32)


@njit(nogil=True, cache=True, inline="always")
def _half_values(k, half):
    """QV row (0: -DELTA, 1: +DELTA) of half ``half`` under shift combination k."""
    if half == 0:
        return 1 if k < 2 else 0
    return 1 if k % 2 == 0 else 0


@njit(nogil=True, cache=True)
def _weights(xb, o, qw, sigma2, weight):
    for i in range(GROUP):
        weight[i] = qw[o + i] * np.sqrt(sigma2 + xb[o + i] * xb[o + i])


@njit(nogil=True, cache=True)
def _search(xb, o, weight, idx, px, pw, sqx, sq2):
    """The best split of group xb[o:o+16] and shift combination: (k, scale, i1, i2),
    k -1 when none has a positive sum of q^2. px / pw float32[2, 17]: prefix sums of
    weight * value and weight over the sorted values, kept per half; sqx / sq2
    float32[4]: per combination."""
    px[0, 0] = F0
    px[1, 0] = F0
    pw[0, 0] = F0
    pw[1, 0] = F0
    for j in range(GROUP):
        i = idx[j]
        h = 0 if i < HALF else 1
        px[h, j + 1] = px[h, j] + weight[i] * xb[o + i]
        px[1 - h, j + 1] = px[1 - h, j]
        pw[h, j + 1] = pw[h, j] + weight[i]
        pw[1 - h, j + 1] = pw[1 - h, j]
    tx0, tx1 = px[0, GROUP], px[1, GROUP]
    tw0, tw1 = pw[0, GROUP], pw[1, GROUP]
    p2 = QV[1, 2]
    m2 = QV[0, 2]
    # the three-class sums collapse (adjacent values differ by 1) to these coefficients
    cp1 = QV[1, 0] * QV[1, 0] - QV[1, 1] * QV[1, 1]
    cp2 = QV[1, 1] * QV[1, 1] - QV[1, 2] * QV[1, 2]
    cm1 = QV[0, 0] * QV[0, 0] - QV[0, 1] * QV[0, 1]
    cm2 = QV[0, 1] * QV[0, 1] - QV[0, 2] * QV[0, 2]
    best = -FLT_MAX
    scale = F0
    bk = -1
    b1 = -1
    b2 = -1
    for i1 in range(GROUP + 1):
        for i2 in range(i1, GROUP + 1):
            sx0 = px[0, i1] + px[0, i2]
            sx1 = px[1, i1] + px[1, i2]
            qxp0 = tx0 * p2 - sx0
            qxm0 = tx0 * m2 - sx0
            qxp1 = tx1 * p2 - sx1
            qxm1 = tx1 * m2 - sx1
            q2p0 = tw0 * p2 * p2 + pw[0, i1] * cp1 + pw[0, i2] * cp2
            q2m0 = tw0 * m2 * m2 + pw[0, i1] * cm1 + pw[0, i2] * cm2
            q2p1 = tw1 * p2 * p2 + pw[1, i1] * cp1 + pw[1, i2] * cp2
            q2m1 = tw1 * m2 * m2 + pw[1, i1] * cm1 + pw[1, i2] * cm2
            sqx[0] = qxp0 + qxp1
            sqx[1] = qxp0 + qxm1
            sqx[2] = qxm0 + qxp1
            sqx[3] = qxm0 + qxm1
            sq2[0] = q2p0 + q2p1
            sq2[1] = q2p0 + q2m1
            sq2[2] = q2m0 + q2p1
            sq2[3] = q2m0 + q2m1
            for k in range(4):
                if sq2[k] > F0 and sqx[k] * sqx[k] > best * sq2[k]:
                    scale = sqx[k] / sq2[k]
                    best = scale * sqx[k]
                    b1 = i1
                    b2 = i2
                    bk = k
    return bk, scale, b1, b2


@njit(nogil=True, cache=True)
def block_iq1m(xb, qw, codes, kmap, nbrs, out, weight, idx, px, pw, sqx, sq2, L, index,
               scales, shifts, terms):
    """One IQ1_M block: the 256 values xb, their column importances qw, into out[0:56].

    Scratch, each written here before it is read: weight float32[16] (importance times
    sqrt(sigma2 + x^2) of the group), idx int32[16] (its sorted order), px / pw / sqx /
    sq2 (_search's), L int32[16] (codes), index int32[2] (grid points), scales
    float32[16] / shifts int32[16] (per group), terms float32[24] (grid_point's).
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
        _weights(xb, o, qw, sigma2, weight)
        amax = abs(xb[o])
        for i in range(1, GROUP):
            a = abs(xb[o + i])
            amax = amax if amax > a else a
        scales[ib] = F0
        shifts[ib] = 0
        if amax < EPS:
            continue
        sort_order(xb, o, GROUP, idx)
        k, scale, b1, b2 = _search(xb, o, weight, idx, px, pw, sqx, sq2)
        if b1 < 0 or b2 < 0 or k < 0:
            continue
        for j in range(GROUP):
            L[idx[j]] = 0 if j < b1 else (1 if j < b2 else 2)
        if scale < F0:
            for j in range(GROUP):
                L[j] = 2 - L[j]
            scale = -scale
            k = 3 - k
        on_grid = True
        for h in range(2):
            qv = QV[_half_values(k, h)]
            g, hit = grid_point(L, 8 * h, codes, kmap, nbrs, xb, o + 8 * h, weight, 8 * h,
                                scale, qv, terms)
            index[h] = g
            on_grid = on_grid and hit
        if not on_grid:
            fx = F0
            f2 = F0
            for h in range(2):
                qv = QV[_half_values(k, h)]
                for j in range(8):
                    w = weight[8 * h + j]
                    q = qv[codes[index[h], j]]
                    fx += w * q * xb[o + 8 * h + j]
                    f2 += w * q * q
            if fx > F0 and f2 > F0:
                scale = fx / f2
        out[2 * ib] = index[0] & 255
        out[2 * ib + 1] = index[1] & 255
        out[32 + ib] = (index[0] >> 8) | ((index[1] >> 8) << 4)
        scales[ib] = scale
        shifts[ib] = k
        max_scale = max_scale if max_scale > scale else scale
    if max_scale == F0:
        return
    # 3-bit scales, then d refitted over the whole block with them (skipped groups too,
    # as grid point 0 under scale 1)
    d = max_scale / F15
    inv = F1 / d
    fx = F0
    f2 = F0
    sc = 0
    for ib in range(QK_K // GROUP):
        s = max(0, min(7, nearest(F05 * (inv * scales[ib] - F1))))
        sc |= s << (3 * (ib % 4))
        if ib % 4 == 3:
            out[48 + 2 * (ib // 4)] = sc & 255
            out[49 + 2 * (ib // 4)] = sc >> 8
            sc = 0
        out[32 + ib] |= SHIFT_BITS[shifts[ib]]
        o = GROUP * ib
        _weights(xb, o, qw, sigma2, weight)
        qh = np.int32(out[32 + ib])
        odd = np.float32(2 * s + 1)
        for h in range(2):
            qv = QV[_half_values(shifts[ib], h)]
            g = np.int32(out[2 * ib + h]) + ((qh << (8 - 4 * h)) & 0x700)
            for j in range(8):
                w = weight[8 * h + j]
                q = qv[codes[g, j]] * odd
                fx += w * q * xb[o + 8 * h + j]
                f2 += w * q * q
    if f2 > F0:
        d = fx / f2
    dh = f32_to_f16(d * D_FUDGE)
    for j in range(4):
        out[49 + 2 * j] |= ((dh >> (4 * j)) & 0xF) << 4


@njit(nogil=True, cache=True)
def rows_iq1m(x, mode, lut, qw, codes, kmap, nbrs, out, start, end):
    """IQ1_M blocks start..end-1 (row-major over (rows, blocks per row)) of the raw input
    bits x (kquant_bits.load_block's modes) with column importances qw, into the uint8
    rows ``out``. Returns how many blocks held NaN or Inf (those are left unwritten)."""
    nb = (x.shape[1] // 2 if mode == 0 else x.shape[1]) // QK_K
    ubuf = np.empty(QK_K, np.uint32)
    xb = ubuf.view(np.float32)
    weight = np.empty(GROUP, np.float32)
    idx = np.empty(GROUP, np.int32)
    px = np.empty((2, GROUP + 1), np.float32)
    pw = np.empty((2, GROUP + 1), np.float32)
    sqx = np.empty(4, np.float32)
    sq2 = np.empty(4, np.float32)
    L = np.empty(GROUP, np.int32)
    index = np.empty(2, np.int32)
    scales = np.empty(QK_K // GROUP, np.float32)
    shifts = np.empty(QK_K // GROUP, np.int32)
    terms = np.empty(24, np.float32)
    bad = 0
    for blk in range(start, end):
        r = blk // nb
        b = blk - r * nb
        if not load_block(x, r, b * QK_K, mode, lut, ubuf):
            bad += 1
            continue
        block_iq1m(xb, qw[b * QK_K:(b + 1) * QK_K], codes, kmap, nbrs,
                   out[r, b * BLOCK_BYTES:(b + 1) * BLOCK_BYTES], weight, idx, px, pw, sqx,
                   sq2, L, index, scales, shifts, terms)
    return bad
