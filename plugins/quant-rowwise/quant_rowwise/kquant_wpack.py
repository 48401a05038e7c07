"""The k-quant block packers with an importance matrix, and their row drivers.

Each packer codes one 256-weight super-block as llama.cpp's ``quantize_row_qN_K_impl``
does when given ``quant_weights`` (``qw``, the importance of each column):

- q2_K: weights qw*sqrt(sigma2 + x**2), sigma2 = sum(x**2)/256; make_qkx3 per 16-value
  sub-block; make_qp for the 4-bit sub-scales and sub-mins;
- q3_K: weights as q2_K's with sigma2 = 2*sum(x**2)/256; make_qx_quants per sub-block,
  then again over the 16 sub-scales for the 6-bit ones;
- q4_K, q5_K: q3_K's weights; make_qkx3 per 32-value sub-block, make_qp for the 6-bit
  sub-scales and sub-mins;
- q6_K: qw itself as the weights of make_qx_quants; sub-scales as without weights.

With ``refine`` the refinement of kquant_refine follows (``affine_refine_w`` /
``sym_refine_w``), weighted by the same weights the search used, so a change is kept
only when it lowers the error llama.cpp's search minimises. Without it the bytes are
llama.cpp's (kquant_wsearch rounds as llama.cpp does) but for rare near-ties in q2_K.
Bytes are laid out by kquant_pack's ``pack_*``.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from . import _cache  # noqa: F401  (the kernel cache, before any @njit here)
from .kquant_bits import F0, FM, arena, f16_to_f32, f32_to_f16, load_block, rint_clamp
from .kquant_pack import pack_q2k, pack_q3k, pack_q6k, pack_q45k, q6k_subscales
from .kquant_refine import affine_refine_w, sym_refine_w
from .kquant_wsearch import (QX16_SCRATCH, make_qkx3, make_qp, make_qx16_w, make_qx_w, spread,
                             spread_weights)
from ._qk import QK_K


@njit(nogil=True, cache=True, fastmath=False)
def _weights(x, qw, qo, factor, wt):
    """wt[0:256] = qw[qo:qo+256] * sqrt(sigma2 + x**2), sigma2 = factor * sum(x**2)/256:
    the importance of each value as llama.cpp's k-quant searches weigh it."""
    spread_weights(x, 0, QK_K, qw, qo, spread(x, 0, QK_K, factor), wt)


@njit(nogil=True, cache=True, fastmath=False)
def _sums(wt, nsub, sub, sw):
    """sw[j] = the summed weight of sub-block j."""
    for j in range(nsub):
        s = F0
        for i in range(sub):
            s += wt[sub * j + i]
        sw[j] = s


@njit(nogil=True, cache=True, fastmath=False)
def _affine_codes(x, nsub, sub, nmax, st, sc, mi, L):
    """Each value's nearest code under the block's final d*sc - dmin*m; a sub-block whose
    scale is 0 keeps the search's codes (they decode to the same values)."""
    D = f16_to_f32(st[0])
    Dm = f16_to_f32(st[1])
    for j in range(nsub):
        dl = D * np.float32(sc[j])
        if dl == F0:
            continue
        ml = Dm * np.float32(mi[j])
        for i in range(sub):
            L[sub * j + i] = rint_clamp((x[sub * j + i] + ml) / dl, 0, nmax)


@njit(nogil=True, cache=True, fastmath=False)
def _sym_codes(x, qlo, qhi, st, sc, L):
    """Each value's nearest code (+ -qlo) under d*sc, 16 sub-blocks of 16; a sub-block
    whose scale is 0 keeps the search's codes."""
    D = f16_to_f32(st[0])
    for j in range(16):
        dl = D * np.float32(sc[j])
        if dl == F0:
            continue
        for i in range(16):
            L[16 * j + i] = rint_clamp(x[16 * j + i] / dl, qlo, qhi) - qlo


@njit(nogil=True, cache=True, fastmath=FM)
def block_q45k_w(x, qw, qo, out, nmax, refine, L, Laux, fs, fm, sc, mi, st, err, wt, sw):
    """One q4_K (nmax 15) or q5_K (nmax 31) super-block, weighted by qw[qo:qo+256].

    Scratch: L int32[256] codes; Laux int32[32] make_qkx2's codes tried; fs, fm
    float32[8] float sub-scales and (negated) mins; sc, mi int32[8] their 6-bit forms;
    st int32[2] f16 bits of d and dmin; err float64[16]; wt float32[256] each value's
    weight; sw float32[8] each sub-block's summed weight.
    """
    _weights(x, qw, qo, 2.0, wt)
    _sums(wt, 8, 32, sw)
    for j in range(8):
        s, m = make_qkx3(32, nmax, x, 32 * j, wt[32 * j:32 * j + 32], L, Laux)
        fs[j] = s
        fm[j] = m
    st[0] = f32_to_f16(make_qp(8, 63, fs, sw, sc))
    st[1] = f32_to_f16(make_qp(8, 63, fm, sw, mi))
    if refine:
        affine_refine_w(x, 8, 32, nmax, 63, st, sc, mi, err, 1, wt)
    _affine_codes(x, 8, 32, nmax, st, sc, mi, L)
    pack_q45k(L, nmax, sc, mi, st, out)


@njit(nogil=True, cache=True, fastmath=FM)
def block_q2k_w(x, qw, qo, out, refine, L, Laux, fs, fm, sc, mi, st, err, wt, sw):
    """One q2_K super-block, weighted by qw[qo:qo+256].

    Scratch: L int32[256] codes; Laux int32[16] make_qkx3's codes tried; fs, fm
    float32[16] float sub-scales and (negated) mins; sc, mi int32[16] their 4-bit forms;
    st int32[2] f16 bits of d and dmin; err float64[32]; wt float32[256] each value's
    weight; sw float32[16] each sub-block's summed weight.
    """
    _weights(x, qw, qo, 1.0, wt)
    _sums(wt, 16, 16, sw)
    for j in range(16):
        s, m = make_qkx3(16, 3, x, 16 * j, wt[16 * j:16 * j + 16], L, Laux)
        fs[j] = s
        fm[j] = m
    st[0] = f32_to_f16(make_qp(16, 15, fs, sw, sc))
    st[1] = f32_to_f16(make_qp(16, 15, fm, sw, mi))
    if refine:
        affine_refine_w(x, 16, 16, 3, 15, st, sc, mi, err, 1, wt)
    _affine_codes(x, 16, 16, 3, st, sc, mi, L)
    pack_q2k(L, sc, mi, st, out)


@njit(nogil=True, cache=True, fastmath=FM)
def block_q3k_w(x, qw, qo, out, refine, L, fs, sc, st, wt, sw, A):
    """One q3_K super-block, weighted by qw[qo:qo+256].

    Scratch: L int32[256] codes; fs float32[16] float sub-scales; sc int32[16] 6-bit
    sub-scales (signed); st[0] the f16 bits of d; wt float32[256] each value's weight;
    sw float32[16] each sub-block's summed weight; A float32[QX16_SCRATCH].
    """
    _weights(x, qw, qo, 2.0, wt)
    _sums(wt, 16, 16, sw)
    make_qx16_w(x, wt, 0, 4, L, fs, A)
    st[0] = f32_to_f16(make_qx_w(16, 32, fs, 0, sw, 0, sc, 0))
    for j in range(16):
        sc[j] -= 32
    if refine:
        sym_refine_w(x, 16, 16, -4, 3, -32, 31, st, sc, L, wt)
    else:
        _sym_codes(x, -4, 3, st, sc, L)
    pack_q3k(L, sc, st, out)


@njit(nogil=True, cache=True, fastmath=FM)
def block_q6k_w(x, qw, qo, out, refine, L, fs, sc, st, wt, A):
    """One q6_K super-block, weighted by qw[qo:qo+256] as they are.

    Scratch: L int32[256] codes; fs float32[16] float sub-scales; sc int32[16] 8-bit
    sub-scales; st[0] the f16 bits of d; wt float32[256] the weights, for sym_refine_w;
    A float32[QX16_SCRATCH].
    """
    make_qx16_w(x, qw, qo, 32, L, fs, A)
    if not q6k_subscales(fs, sc, st):
        for i in range(210):
            out[i] = 0
        return
    if refine:
        for i in range(QK_K):
            wt[i] = qw[qo + i]
        sym_refine_w(x, 16, 16, -32, 31, -128, 127, st, sc, L, wt)
    else:
        _sym_codes(x, -32, 31, st, sc, L)
    pack_q6k(L, sc, st, out)


# The row drivers, as kquant_pack's (same arguments, same scratch arena) with qw, the
# float32 importance of each column of a row, after lut. Scratch offsets: ubuf uint32[256]
# the block's f32 bits (xb: the same memory as float32); L int32[256]; fs, fm float32[16];
# sc, mi int32[16]; st int32[2]; err float64[32]; wt float32[256]; sw float32[16];
# Laux int32[32] (q2_K, q4_K, q5_K); A float32[QX16_SCRATCH] (q3_K, q6_K).


@njit(nogil=True, cache=True, fastmath=FM)
def rows_q45k_w(x, mode, lut, qw, nmax, refine, out, start, end):
    """q4_K (nmax 15) or q5_K (nmax 31) blocks start..end-1, weighted by qw."""
    nb = (x.shape[1] // 2 if mode == 0 else x.shape[1]) // QK_K
    ts = out.shape[1] // nb
    buf = arena()
    ubuf = buf[0:1024].view(np.uint32)
    xb = ubuf.view(np.float32)
    L = buf[1024:2048].view(np.int32)
    fs = buf[2048:2112].view(np.float32)
    fm = buf[2112:2176].view(np.float32)
    sc = buf[2176:2240].view(np.int32)
    mi = buf[2240:2304].view(np.int32)
    st = buf[2304:2312].view(np.int32)
    err = buf[2368:2624].view(np.float64)
    wt = buf[2624:3648].view(np.float32)
    sw = buf[3648:3712].view(np.float32)
    Laux = buf[3712:3840].view(np.int32)
    bad = 0
    for blk in range(start, end):
        r = blk // nb
        b = blk - r * nb
        if not load_block(x, r, b * QK_K, mode, lut, ubuf):
            bad += 1
            continue
        block_q45k_w(xb, qw, b * QK_K, out[r, b * ts:(b + 1) * ts], nmax, refine, L, Laux, fs,
                     fm, sc, mi, st, err, wt, sw)
    return bad


@njit(nogil=True, cache=True, fastmath=FM)
def rows_q2k_w(x, mode, lut, qw, refine, out, start, end):
    """q2_K blocks start..end-1, weighted by qw."""
    nb = (x.shape[1] // 2 if mode == 0 else x.shape[1]) // QK_K
    ts = out.shape[1] // nb
    buf = arena()
    ubuf = buf[0:1024].view(np.uint32)
    xb = ubuf.view(np.float32)
    L = buf[1024:2048].view(np.int32)
    fs = buf[2048:2112].view(np.float32)
    fm = buf[2112:2176].view(np.float32)
    sc = buf[2176:2240].view(np.int32)
    mi = buf[2240:2304].view(np.int32)
    st = buf[2304:2312].view(np.int32)
    err = buf[2368:2624].view(np.float64)
    wt = buf[2624:3648].view(np.float32)
    sw = buf[3648:3712].view(np.float32)
    Laux = buf[3712:3840].view(np.int32)
    bad = 0
    for blk in range(start, end):
        r = blk // nb
        b = blk - r * nb
        if not load_block(x, r, b * QK_K, mode, lut, ubuf):
            bad += 1
            continue
        block_q2k_w(xb, qw, b * QK_K, out[r, b * ts:(b + 1) * ts], refine, L, Laux, fs, fm, sc,
                    mi, st, err, wt, sw)
    return bad


@njit(nogil=True, cache=True, fastmath=FM)
def rows_q3k_w(x, mode, lut, qw, refine, out, start, end):
    """q3_K blocks start..end-1, weighted by qw."""
    nb = (x.shape[1] // 2 if mode == 0 else x.shape[1]) // QK_K
    ts = out.shape[1] // nb
    buf = arena()
    ubuf = buf[0:1024].view(np.uint32)
    xb = ubuf.view(np.float32)
    L = buf[1024:2048].view(np.int32)
    fs = buf[2048:2112].view(np.float32)
    sc = buf[2176:2240].view(np.int32)
    st = buf[2304:2312].view(np.int32)
    wt = buf[2624:3648].view(np.float32)
    sw = buf[3648:3712].view(np.float32)
    A = buf[3840:3840 + 4 * QX16_SCRATCH].view(np.float32)
    bad = 0
    for blk in range(start, end):
        r = blk // nb
        b = blk - r * nb
        if not load_block(x, r, b * QK_K, mode, lut, ubuf):
            bad += 1
            continue
        block_q3k_w(xb, qw, b * QK_K, out[r, b * ts:(b + 1) * ts], refine, L, fs, sc, st, wt,
                    sw, A)
    return bad


@njit(nogil=True, cache=True, fastmath=FM)
def rows_q6k_w(x, mode, lut, qw, refine, out, start, end):
    """q6_K blocks start..end-1, weighted by qw."""
    nb = (x.shape[1] // 2 if mode == 0 else x.shape[1]) // QK_K
    ts = out.shape[1] // nb
    buf = arena()
    ubuf = buf[0:1024].view(np.uint32)
    xb = ubuf.view(np.float32)
    L = buf[1024:2048].view(np.int32)
    fs = buf[2048:2112].view(np.float32)
    sc = buf[2176:2240].view(np.int32)
    st = buf[2304:2312].view(np.int32)
    wt = buf[2624:3648].view(np.float32)
    A = buf[3840:3840 + 4 * QX16_SCRATCH].view(np.float32)
    bad = 0
    for blk in range(start, end):
        r = blk // nb
        b = blk - r * nb
        if not load_block(x, r, b * QK_K, mode, lut, ubuf):
            bad += 1
            continue
        block_q6k_w(xb, qw, b * QK_K, out[r, b * ts:(b + 1) * ts], refine, L, fs, sc, st, wt, A)
    return bad
