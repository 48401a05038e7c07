"""The IQ2 block packers (iq2_xxs, iq2_xs, iq2_s): each turns one 256-weight super-block
into ggml's bytes (per sub-block: importance weights, sign folding, the scale search of
``iq2_search``, grid indices and signs; then 4-bit sub-scales under an f16 super-scale),
and one row driver runs the packer of a type over a run of blocks.

Like ``iq2_search``, no fast-math: float32 operations in ggml's order, sums sequential.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from . import _cache  # noqa: F401  (the kernel cache, before any @njit here)
from ._qk import QK_K
from .iq2_search import F0, F1, FIVE, HALF, qp_scale, search, split_signs
from .kquant_bits import f32_to_f16, load_block, nearest, put_f16

F31 = np.float32(31.0)
QUARTER = np.float32(0.25)
EPS_XS = np.float32(1e-15)  # ggml's GROUP_MAX_EPS
EPS_S = np.float32(1e-8)  # GROUP_MAX_EPS_IQ2_S
S_SHRINK = np.float32(0.9875)  # iq2_s stores its super-scale a little smaller

XXS, XS, S = 0, 1, 2


@njit(nogil=True, cache=True)
def _sum_squares(xb):
    sumx2 = F0
    for i in range(QK_K):
        sumx2 += xb[i] * xb[i]
    return sumx2


@njit(nogil=True, cache=True)
def _importance(xb, b0, n, qw, c0, sigma2, weight, waux):
    """weight = importance * sqrt(sigma2 + x**2) of xb[b0:b0+n], and its square root."""
    for i in range(n):
        v = xb[b0 + i]
        weight[i] = qw[c0 + i] * np.sqrt(sigma2 + v * v)
    for i in range(n):
        waux[i] = np.sqrt(weight[i])


@njit(nogil=True, cache=True)
def _index(L, x0, kmap):
    """The grid index of the levels L[x0:x0+8] (a point of the grid: the searches end on one)."""
    u = 0
    for i in range(8):
        u |= L[x0 + i] << (2 * i)
    return kmap[u]


@njit(nogil=True, cache=True)
def _sub_scale(d, s):
    """The 4-bit code of sub-block scale s under the super-scale d."""
    return max(0, min(15, nearest(HALF * ((F1 / d) * s - F1))))


@njit(nogil=True, cache=True)
def block_xxs(xb, qw, c0, points, kmap, nbrs, out, weight, waux, xval, L, Laux, scales, q2, sg):
    """One iq2_xxs super-block into out[0:66]: d, then per sub-block of 32 a uint32 of four
    8-bit grid indices and a uint32 of four 7-bit signs and the 4-bit scale.

    Scratch: weight, waux, xval float32[32]; L, Laux int32[32]; scales float32[8]; q2
    uint32[16], the packed words; sg int32[4], a sub-block's sign bytes.
    """
    sigma2 = _sum_squares(xb) / np.float32(QK_K)
    max_scale = F0
    for j in range(16):
        q2[j] = 0
    for ib in range(8):
        _importance(xb, 32 * ib, 32, qw, c0 + 32 * ib, sigma2, weight, waux)
        split_signs(xb, 32 * ib, 4, True, weight, xval, sg)
        mx = xval[0]
        for i in range(1, 32):
            if not mx > xval[i]:
                mx = xval[i]
        scales[ib] = F0
        if mx < EPS_XS:
            continue
        # make_qp_quants' scale on levels 0..4 sets where the candidates lie
        scale = qp_scale(32, 4, xval, weight, L)
        eff_max = scale * np.float32(3.0)
        if eff_max <= F0:
            continue
        scale = search(4, xval, weight, waux, eff_max, scale, 6, True, points, kmap, nbrs, L, Laux)
        if scale < F0:
            scale = -scale
            for k in range(4):
                sg[k] = ~sg[k] & 127
        for k in range(4):
            q2[2 * ib] |= np.uint32(_index(L, 8 * k, kmap)) << np.uint32(8 * k)
            q2[2 * ib + 1] |= np.uint32(sg[k]) << np.uint32(7 * k)
        scales[ib] = scale
        if not max_scale > scale:
            max_scale = scale
    if max_scale == F0:
        for j in range(66):
            out[j] = 0
        return
    d = max_scale / F31
    put_f16(out, 0, f32_to_f16(d))
    for ib in range(8):
        q2[2 * ib + 1] |= np.uint32(_sub_scale(d, scales[ib])) << np.uint32(28)
    for j in range(16):
        for b in range(4):
            out[2 + 4 * j + b] = (q2[j] >> np.uint32(8 * b)) & np.uint32(255)


@njit(nogil=True, cache=True)
def block_xs_s(kind, xb, qw, has_w, c0, points, kmap, nbrs, out, weight, waux, xval, L, Laux,
               scales, sg):
    """One iq2_xs (kind XS, out[0:74]) or iq2_s (kind S, out[0:82]) super-block.

    iq2_xs: d, 32 uint16 of a 9-bit grid index and 7 sign bits, 8 bytes of two 4-bit
    scales. iq2_s: d, 32 low bytes of 10-bit grid indices, 32 sign bytes (all 8 signs, no
    folding), 8 bytes of the indices' top 2 bits, 8 bytes of scales; its weights without
    an importance matrix (``has_w`` False) are sigma2 / 4 + x**2.
    Scratch: weight, waux, xval float32[16]; L, Laux int32[16]; scales float32[16]; sg
    int32[2].
    """
    size = 74 if kind == XS else 82
    for j in range(size):
        out[j] = 0
    sumx2 = _sum_squares(xb)
    sigma2 = sumx2 / np.float32(QK_K) if kind == XS else np.float32(2.0) * sumx2 / np.float32(QK_K)
    max_scale = F0
    for ib in range(16):
        b0 = 16 * ib
        if has_w:
            _importance(xb, b0, 16, qw, c0 + b0, sigma2, weight, waux)
        else:
            for i in range(16):
                weight[i] = QUARTER * sigma2 + xb[b0 + i] * xb[b0 + i]
            for i in range(16):
                waux[i] = np.sqrt(weight[i])
        split_signs(xb, b0, 2, kind == XS, weight, xval, sg)
        mx = xval[0]
        for i in range(1, 16):
            if not mx > xval[i]:
                mx = xval[i]
        scales[ib] = F0
        if mx < (EPS_XS if kind == XS else EPS_S):
            continue
        scale = search(2, xval, weight, waux, mx, mx / FIVE, 9, False, points, kmap, nbrs, L, Laux)
        if scale < F0:
            scale = -scale
            for k in range(2):
                sg[k] = ~sg[k] & (127 if kind == XS else 255)
        for k in range(2):
            gi = _index(L, 8 * k, kmap)
            i8 = 2 * ib + k
            if kind == XS:
                v = gi | (sg[k] << 9)
                out[2 + 2 * i8] = v & 255
                out[3 + 2 * i8] = v >> 8
            else:
                out[2 + i8] = gi & 255
                out[66 + i8 // 4] |= (gi >> 8) << (2 * (i8 % 4))
                out[34 + i8] = sg[k]
        scales[ib] = scale
        if not max_scale > scale:
            max_scale = scale
    if max_scale == F0:
        if kind == XS:
            for j in range(size):
                out[j] = 0
        return
    d = max_scale / F31
    put_f16(out, 0, f32_to_f16(d if kind == XS else d * S_SHRINK))
    so = 66 if kind == XS else 74
    for ib in range(16):
        out[so + ib // 2] |= _sub_scale(d, scales[ib]) << (4 * (ib % 2))


@njit(nogil=True, cache=True)
def rows_iq2(x, mode, lut, kind, qw, has_w, points, kmap, nbrs, out, start, end):
    """Blocks start..end-1 (row-major over rows of ``out``) of type ``kind`` (XXS, XS, S)
    from the raw input bits ``x`` (kquant_bits.load_block's mode and table); ``qw`` the
    importance of each column (unused when ``has_w`` is False). Returns how many blocks
    held NaN or Inf (their bytes are left unwritten)."""
    nb = (x.shape[1] // 2 if mode == 0 else x.shape[1]) // QK_K
    ts = out.shape[1] // nb
    ubuf = np.empty(QK_K, np.uint32)
    xb = ubuf.view(np.float32)
    weight = np.zeros(32, np.float32)
    waux = np.zeros(32, np.float32)
    xval = np.zeros(32, np.float32)
    L = np.zeros(32, np.int32)
    Laux = np.zeros(32, np.int32)
    scales = np.zeros(16, np.float32)
    q2 = np.zeros(16, np.uint32)
    sg = np.zeros(4, np.int32)
    bad = 0
    for blk in range(start, end):
        r = blk // nb
        b = blk - r * nb
        if not load_block(x, r, b * QK_K, mode, lut, ubuf):
            bad += 1
            continue
        o = out[r, b * ts:(b + 1) * ts]
        if kind == XXS:
            block_xxs(xb, qw, b * QK_K, points, kmap, nbrs, o, weight, waux, xval, L, Laux,
                      scales, q2, sg)
        else:
            block_xs_s(kind, xb, qw, has_w, b * QK_K, points, kmap, nbrs, o, weight, waux,
                       xval, L, Laux, scales, sg)
    return bad
