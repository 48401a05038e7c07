"""The k-quant block packers: each turns one 256-weight super-block into ggml's bytes for
its type (search, integer sub-scales under an f16 super-scale, optional refinement, final
codes, bit packing), and one row driver per type runs its packer over a run of blocks.
The bit packing (``pack_*``) and q6_K's sub-scales (``q6k_subscales``) are functions of
their own, shared with the packers with an importance matrix in kquant_wpack.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from . import _cache  # noqa: F401  (the kernel cache, before any @njit here)
from .kquant_bits import (F0, F1, FM, arena, f16_to_f32, f32_to_f16, load_block, nearest,
                          put_f16, rint_clamp)
from .kquant_refine import affine_refine, sym_refine
from .kquant_search import (GROUP_MAX_EPS, K_WT, LANE_SCRATCH, make_q3x16, make_qkx2,
                            make_qkx2_lanes, make_qx16)
from ._qk import QK_K

# Refinement rounds for q4_K, q5_K, q2_K: one; a second lowers the error little for its
# time (docs/benchmarks.md).
_ITERS = (1, 1, 1)


@njit(nogil=True, cache=True)
def _pack_scale_min_k4(sc, mi, out, o):
    """The 8 6-bit sub-scales and sub-mins of q4_K/q5_K into the 12 bytes at out[o:o+12]."""
    for j in range(12):
        out[o + j] = 0
    for j in range(8):
        ls = sc[j]
        lm = mi[j]
        if j < 4:
            out[o + j] = ls
            out[o + j + 4] = lm
        else:
            out[o + j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            out[o + j - 4] |= (ls >> 4) << 6
            out[o + j] |= (lm >> 4) << 6


@njit(nogil=True, cache=True, fastmath=FM)
def block_q45k(x, out, nmax, refine, L, Laux, w, fs, fm, sc, mi, st, err, wt):
    """One q4_K (nmax 15) or q5_K (nmax 31) super-block into out[0:144|176].

    Scratch, nothing in it read before it is written here: L int32[256], the codes;
    Laux int32[32] and w float32[32], make_qkx2's codes tried and weights for one
    sub-block; fs[0:8], fm[0:8], the sub-blocks' float scales and (negated) mins;
    sc[0:8], mi[0:8], their 6-bit forms; st[0:2], the f16 bits of d and dmin; err
    float64[16+] and wt float32[256], affine_refine's.
    """
    if nmax == 15:
        rmin = np.float32(-1.0)
        nstep = 20
    else:
        rmin = np.float32(-0.5)
        nstep = 15
    rdelta = np.float32(0.1)
    max_scale = F0
    max_min = F0
    for j in range(8):
        sum_x2 = F0
        for l in range(32):
            v = x[32 * j + l]
            sum_x2 += v * v
        av_x = np.sqrt(sum_x2 / np.float32(32.0))
        for l in range(32):
            w[l] = av_x + abs(x[32 * j + l])
        s, m = make_qkx2(32, nmax, x, 32 * j, w, L, Laux, rmin, rdelta, nstep, False)
        fs[j] = s
        fm[j] = m
        if s > max_scale:
            max_scale = s
        if m > max_min:
            max_min = m
    inv_scale = np.float32(63.0) / max_scale if max_scale > F0 else F0
    inv_min = np.float32(63.0) / max_min if max_min > F0 else F0
    for j in range(8):
        sc[j] = min(63, nearest(inv_scale * fs[j]) & 0xFF)
        mi[j] = min(63, nearest(inv_min * fm[j]) & 0xFF)
    st[0] = f32_to_f16(max_scale / np.float32(63.0))
    st[1] = f32_to_f16(max_min / np.float32(63.0))
    if refine:
        affine_refine(x, 8, 32, nmax, 63, st, sc, mi, err, _ITERS[1 if nmax == 31 else 0], wt)
    D = f16_to_f32(st[0])
    Dm = f16_to_f32(st[1])
    for j in range(8):
        dl = D * np.float32(sc[j])
        if dl == F0:
            continue
        ml = Dm * np.float32(mi[j])
        for i in range(32):
            L[32 * j + i] = rint_clamp((x[32 * j + i] + ml) / dl, 0, nmax)
    pack_q45k(L, nmax, sc, mi, st, out)


@njit(nogil=True, cache=True)
def pack_q45k(L, nmax, sc, mi, st, out):
    """q4_K (nmax 15) or q5_K (nmax 31) bytes into out: codes L[0:256], 6-bit sub-scales
    sc[0:8] and sub-mins mi[0:8], f16 bits of d and dmin st[0:2]."""
    put_f16(out, 0, st[0])
    put_f16(out, 2, st[1])
    _pack_scale_min_k4(sc, mi, out, 4)
    if nmax == 15:
        for c in range(4):
            for l in range(32):
                out[16 + 32 * c + l] = L[64 * c + l] | (L[64 * c + 32 + l] << 4)
    else:
        for l in range(32):
            h = 0
            for k in range(8):
                h |= (L[32 * k + l] >> 4) << k
            out[16 + l] = h
        for c in range(4):
            for l in range(32):
                out[48 + 32 * c + l] = (L[64 * c + l] & 0xF) | ((L[64 * c + 32 + l] & 0xF) << 4)


@njit(nogil=True, cache=True, fastmath=FM)
def block_q6k(x, out, refine, L, fs, sc, st, err, wt, S):
    """One q6_K super-block into out[0:210].

    Scratch: L int32[256] codes; fs float32[16] float sub-scales; sc int32[16] 8-bit
    sub-scales; st[0] the f16 bits of d; wt float32[256] for sym_refine;
    S float32[9, 256] for make_qx16; err unused.
    """
    make_qx16(x, L, fs, S)
    if not q6k_subscales(fs, sc, st):
        for i in range(210):
            out[i] = 0
        return
    D = f16_to_f32(st[0])
    if refine:
        sym_refine(x, 16, 16, -32, 31, -128, 127, st, sc, L, wt)
    for j in range(16 if not refine else 0):
        dl = D * np.float32(sc[j])
        if dl == F0:
            continue
        for i in range(16):
            L[16 * j + i] = rint_clamp(x[16 * j + i] / dl, -32, 31) + 32
    pack_q6k(L, sc, st, out)


@njit(nogil=True, cache=True, fastmath=FM)
def q6k_subscales(fs, sc, st):
    """q6_K's 8-bit sub-scales sc[0:16] and the f16 bits of d (st[0]) from the float
    sub-scales fs[0:16]; False when all are below GROUP_MAX_EPS (an all-zero block)."""
    max_scale = F0
    max_abs = F0
    for ib in range(16):
        s = fs[ib]
        if abs(s) > max_abs:
            max_abs = abs(s)
            max_scale = s
    if max_abs < GROUP_MAX_EPS:
        return False
    iscale = np.float32(-128.0) / max_scale
    st[0] = f32_to_f16(F1 / iscale)
    for ib in range(16):
        sc[ib] = min(127, nearest(iscale * fs[ib]))
    return True


@njit(nogil=True, cache=True)
def pack_q6k(L, sc, st, out):
    """q6_K bytes into out: codes + 32 L[0:256], 8-bit sub-scales sc[0:16], f16 bits of d
    st[0]."""
    for h in range(2):
        for l in range(32):
            b = 128 * h + l
            q1 = L[b]
            q2 = L[b + 32]
            q3 = L[b + 64]
            q4 = L[b + 96]
            out[64 * h + l] = (q1 & 0xF) | ((q3 & 0xF) << 4)
            out[64 * h + l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4)
            out[128 + 32 * h + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)
    for ib in range(16):
        out[192 + ib] = sc[ib] & 0xFF
    put_f16(out, 208, st[0])


@njit(nogil=True, cache=True, fastmath=FM)
def block_q3k(x, out, refine, L, fs, sc, st, err, wt, A):
    """One q3_K super-block into out[0:110].

    Scratch: L int32[256] codes; fs float32[16] float sub-scales; sc int32[16] 6-bit
    sub-scales (signed); st[0] the f16 bits of d; wt float32[256] for sym_refine;
    A float32[LANE_SCRATCH] for make_q3x16; err unused.
    """
    max_scale = F0
    amax = F0
    make_q3x16(x, L, fs, A)
    for j in range(16):
        s = fs[j]
        if abs(s) > amax:
            amax = abs(s)
            max_scale = s
    if max_scale != F0:
        iscale = np.float32(-32.0) / max_scale
        for j in range(16):
            l = nearest(iscale * fs[j])
            # ggml stores the rounded value in an int8 before clamping it
            l = ((l + 128) & 0xFF) - 128
            sc[j] = max(-32, min(31, l))
        st[0] = f32_to_f16(F1 / iscale)
    else:
        for j in range(16):
            sc[j] = -32
        st[0] = 0
    D = f16_to_f32(st[0])
    if refine and max_scale != F0:
        sym_refine(x, 16, 16, -4, 3, -32, 31, st, sc, L, wt)
    for j in range(16 if not refine else 0):
        dl = D * np.float32(sc[j])
        if dl == F0:
            continue
        idl = F1 / dl
        for i in range(16):
            L[16 * j + i] = rint_clamp(x[16 * j + i] * idl, -4, 3) + 4
    pack_q3k(L, sc, st, out)


@njit(nogil=True, cache=True)
def pack_q3k(L, sc, st, out):
    """q3_K bytes into out: codes + 4 L[0:256], 6-bit signed sub-scales sc[0:16], f16 bits
    of d st[0]."""
    for i in range(96, 108):
        out[i] = 0
    for j in range(16):
        l = sc[j] + 32
        if j < 8:
            out[96 + j] = l & 0xF
        else:
            out[96 + j - 8] |= (l & 0xF) << 4
        out[96 + 8 + j % 4] |= (l >> 4) << (2 * (j // 4))
    for l in range(32):
        h = 0
        for k in range(8):
            h |= (L[32 * k + l] >> 2) << k
        out[l] = h
    for h in range(2):
        for l in range(32):
            b = 128 * h + l
            out[32 + 32 * h + l] = ((L[b] & 3) | ((L[b + 32] & 3) << 2) | ((L[b + 64] & 3) << 4)
                                    | ((L[b + 96] & 3) << 6))
    put_f16(out, 108, st[0])


@njit(nogil=True, cache=True, fastmath=FM)
def block_q2k(x, out, refine, L, A, fs, fm, sc, mi, st, err, wt):
    """One q2_K super-block into out[0:84].

    Scratch: L int32[256] codes; A float32[LANE_SCRATCH] for make_qkx2_lanes (the weights
    are written into it here); fs, fm float32[16] float sub-scales and (negated) mins;
    sc, mi int32[16] their 4-bit forms; st int32[2] f16 bits of d and dmin;
    err float64[32] and wt float32[256] for affine_refine.
    """
    max_scale = F0
    max_min = F0
    for j in range(16):
        for l in range(16):
            A[K_WT + 16 * l + j] = abs(x[16 * j + l])
    make_qkx2_lanes(x, 16, 16, 3, np.float32(-0.5), np.float32(0.1), 15, A, L, fs, fm)
    for j in range(16):
        s = fs[j]
        m = fm[j]
        if s > max_scale:
            max_scale = s
        if m > max_min:
            max_min = m
    q4 = np.float32(15.0)
    if max_scale > F0:
        iscale = q4 / max_scale
        for j in range(16):
            sc[j] = nearest(iscale * fs[j]) & 0xF
        st[0] = f32_to_f16(max_scale / q4)
    else:
        for j in range(16):
            sc[j] = 0
        st[0] = 0
    if max_min > F0:
        iscale = q4 / max_min
        for j in range(16):
            mi[j] = nearest(iscale * fm[j]) & 0xF
        st[1] = f32_to_f16(max_min / q4)
    else:
        for j in range(16):
            mi[j] = 0
        st[1] = 0
    if refine:
        affine_refine(x, 16, 16, 3, 15, st, sc, mi, err, _ITERS[2], wt)
    D = f16_to_f32(st[0])
    Dm = f16_to_f32(st[1])
    for j in range(16):
        dl = D * np.float32(sc[j])
        if dl == F0:
            continue
        ml = Dm * np.float32(mi[j])
        for i in range(16):
            L[16 * j + i] = rint_clamp((x[16 * j + i] + ml) / dl, 0, 3)
    pack_q2k(L, sc, mi, st, out)


@njit(nogil=True, cache=True)
def pack_q2k(L, sc, mi, st, out):
    """q2_K bytes into out: codes L[0:256], 4-bit sub-scales sc[0:16] and sub-mins
    mi[0:16], f16 bits of d and dmin st[0:2]."""
    for j in range(16):
        out[j] = sc[j] | (mi[j] << 4)
    for h in range(2):
        for l in range(32):
            b = 128 * h + l
            out[16 + 32 * h + l] = L[b] | (L[b + 32] << 2) | (L[b + 64] << 4) | (L[b + 96] << 6)
    put_f16(out, 80, st[0])
    put_f16(out, 82, st[1])


# The row drivers: one per block type, so a conversion compiles only the packers it uses.
# Each quantizes the 256-weight blocks start..end-1 of the uint16 bit rows ``x`` (counted
# row-major over (rows, blocks per row)) into ``out`` (uint8, rows x blocks per row * type
# size) and returns how many of them held NaN/Inf. mode, lut: how load_block widens x.
# They are serial and release the GIL; kquants.py runs them over runs of blocks in threads.
# Scratch, cut once per call from one aligned buffer at fixed 64-byte-aligned offsets
# (kquant_bits.arena; the offsets are literal, which compiles faster than a helper):
# ubuf uint32[256], the block's f32 bits (xb: the same memory as float32); L int32[256], each value's code; fs, fm float32[16], the sub-blocks'
# float scales and (negated) mins from the search; sc, mi int32[16], their integer forms;
# st int32[2], the f16 bits of d and dmin; err float64[32] and wt float32[256], the
# refinements' per-sub-block errors and per-value weights; A float32[LANE_SCRATCH], the
# lane searches' flat scratch (q2_K, q3_K); Laux int32[32] and w float32[32], make_qkx2's
# codes tried and weights (q4_K, q5_K); S float32[9, 256], make_qx16's scratch (q6_K).


@njit(nogil=True, cache=True, fastmath=FM)
def rows_q45k(x, mode, lut, nmax, refine, out, start, end):
    """q4_K (nmax 15) or q5_K (nmax 31) blocks start..end-1."""
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
    Laux = buf[3648:3776].view(np.int32)
    w = buf[3776:3904].view(np.float32)
    bad = 0
    for blk in range(start, end):
        r = blk // nb
        b = blk - r * nb
        if not load_block(x, r, b * QK_K, mode, lut, ubuf):
            bad += 1
            continue
        block_q45k(xb, out[r, b * ts:(b + 1) * ts], nmax, refine, L, Laux, w, fs, fm, sc, mi,
                   st, err, wt)
    return bad


@njit(nogil=True, cache=True, fastmath=FM)
def rows_q6k(x, mode, lut, refine, out, start, end):
    """q6_K blocks start..end-1."""
    nb = (x.shape[1] // 2 if mode == 0 else x.shape[1]) // QK_K
    ts = out.shape[1] // nb
    buf = arena()
    ubuf = buf[0:1024].view(np.uint32)
    xb = ubuf.view(np.float32)
    L = buf[1024:2048].view(np.int32)
    fs = buf[2048:2112].view(np.float32)
    sc = buf[2112:2176].view(np.int32)
    st = buf[2176:2184].view(np.int32)
    err = buf[2240:2496].view(np.float64)
    wt = buf[2496:3520].view(np.float32)
    Sf = buf[3520:12736].view(np.float32)
    S = Sf.reshape((9, QK_K))
    bad = 0
    for blk in range(start, end):
        r = blk // nb
        b = blk - r * nb
        if not load_block(x, r, b * QK_K, mode, lut, ubuf):
            bad += 1
            continue
        block_q6k(xb, out[r, b * ts:(b + 1) * ts], refine, L, fs, sc, st, err, wt, S)
    return bad


@njit(nogil=True, cache=True, fastmath=FM)
def rows_q3k(x, mode, lut, refine, out, start, end):
    """q3_K blocks start..end-1."""
    nb = (x.shape[1] // 2 if mode == 0 else x.shape[1]) // QK_K
    ts = out.shape[1] // nb
    buf = arena()
    ubuf = buf[0:1024].view(np.uint32)
    xb = ubuf.view(np.float32)
    L = buf[1024:2048].view(np.int32)
    fs = buf[2048:2112].view(np.float32)
    sc = buf[2112:2176].view(np.int32)
    st = buf[2176:2184].view(np.int32)
    err = buf[2240:2496].view(np.float64)
    wt = buf[2496:3520].view(np.float32)
    A = buf[3520:3520 + 4 * LANE_SCRATCH].view(np.float32)
    bad = 0
    for blk in range(start, end):
        r = blk // nb
        b = blk - r * nb
        if not load_block(x, r, b * QK_K, mode, lut, ubuf):
            bad += 1
            continue
        block_q3k(xb, out[r, b * ts:(b + 1) * ts], refine, L, fs, sc, st, err, wt, A)
    return bad


@njit(nogil=True, cache=True, fastmath=FM)
def rows_q2k(x, mode, lut, refine, out, start, end):
    """q2_K blocks start..end-1."""
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
    A = buf[3648:3648 + 4 * LANE_SCRATCH].view(np.float32)
    bad = 0
    for blk in range(start, end):
        r = blk // nb
        b = blk - r * nb
        if not load_block(x, r, b * QK_K, mode, lut, ubuf):
            bad += 1
            continue
        block_q2k(xb, out[r, b * ts:(b + 1) * ts], refine, L, A, fs, fm, sc, mi, st, err, wt)
    return bad
