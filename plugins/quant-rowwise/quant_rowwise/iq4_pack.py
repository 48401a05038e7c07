"""The IQ4_NL / IQ4_XS kernels: llama.cpp's scale search over its 16 non-linear levels,
the block packers and their row drivers, and the dequantizers.

Both types code each 32-value sub-block as 4-bit indices into the same 16 levels
(``KVALUES``, int8 from -127 to 113) times a scale. iq4_nl stores that scale as an f16
per 32 values; iq4_xs groups 8 sub-blocks under one f16 super-scale and stores each
sub-block's scale as a signed 6-bit multiple of it. The search is llama.cpp's
``quantize_row_iq4_nl_impl`` with ``ntry = 7``: the scale from the sub-block's extreme
value, then 15 scales around it, each refitted by weighted least squares
(``sum w q x / sum w q q``); the best fit is kept. Weights are ``x**2`` without an
importance matrix and ``imatrix * sqrt(sigma2 + x**2)`` with one, sigma2 being twice the
block's mean square.

The float32 arithmetic follows the C source operation by operation and without fast-math
(no reassociation, no fused multiply-add), so the bytes equal ggml's. Speed comes from
two reorderings that keep every rounding: the 16 trial scales of a sub-block are run side
by side (each trial's sums still add the 32 values in order, and the trials vectorize as
lanes), and the nearest level is found by comparing the value with the 15 midpoints
between levels, branch-free (the same answer as ggml's binary search with its tie rule
for every float32, checked exhaustively once; the tests check the neighbourhood of every
midpoint).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from . import _cache  # noqa: F401  (the kernel cache, before any @njit here)
from ._bits import f32_from_bits
from .kquant_bits import f32_to_f16, nearest, put_f16

# ggml's kvalues_iq4nl
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                   np.float32)
F0 = np.float32(0.0)
F1 = np.float32(1.0)
GROUP_MAX_EPS = np.float32(1e-15)  # a sub-block whose largest |x| is below this codes as 0
NTRY = 7  # trial scales either side of the extreme-value one, as llama-quantize runs it
LANES = 2 * NTRY + 2  # the extreme-value fit, then itry = -NTRY..NTRY
SUB = 32  # values per sub-block (and per iq4_nl block)
# bytes per block: iq4_nl (f16 d, 16 bytes of codes); iq4_xs (f16 d, u16 high scale
# bits, 4 bytes of low scale bits, 128 bytes of codes)
NL_SIZE = 18
XS_SIZE = 136


@njit(nogil=True, cache=True, inline="always")
def level(a):
    """The level nearest ``a``, as float32: the level above each midpoint at or below
    ``a`` in turn, so the last one (a value on a midpoint goes up, as in ggml). A chain
    of selects: two vector operations per midpoint, no branches."""
    q = np.float32(-127.0)
    q = np.float32(-104.0) if a >= np.float32(-115.5) else q
    q = np.float32(-83.0) if a >= np.float32(-93.5) else q
    q = np.float32(-65.0) if a >= np.float32(-74.0) else q
    q = np.float32(-49.0) if a >= np.float32(-57.0) else q
    q = np.float32(-35.0) if a >= np.float32(-42.0) else q
    q = np.float32(-22.0) if a >= np.float32(-28.5) else q
    q = np.float32(-10.0) if a >= np.float32(-16.0) else q
    q = np.float32(1.0) if a >= np.float32(-4.5) else q
    q = np.float32(13.0) if a >= np.float32(7.0) else q
    q = np.float32(25.0) if a >= np.float32(19.0) else q
    q = np.float32(38.0) if a >= np.float32(31.5) else q
    q = np.float32(53.0) if a >= np.float32(45.5) else q
    q = np.float32(69.0) if a >= np.float32(61.0) else q
    q = np.float32(89.0) if a >= np.float32(79.0) else q
    q = np.float32(113.0) if a >= np.float32(101.0) else q
    return q


@njit(nogil=True, cache=True, inline="always")
def index(a):
    """The 4-bit code of the level nearest ``a`` (ggml's best_index_int8 on kvalues_iq4nl)."""
    return ((a >= np.float32(-115.5)) + (a >= np.float32(-93.5)) + (a >= np.float32(-74.0))
            + (a >= np.float32(-57.0)) + (a >= np.float32(-42.0)) + (a >= np.float32(-28.5))
            + (a >= np.float32(-16.0)) + (a >= np.float32(-4.5)) + (a >= np.float32(7.0))
            + (a >= np.float32(19.0)) + (a >= np.float32(31.5)) + (a >= np.float32(45.5))
            + (a >= np.float32(61.0)) + (a >= np.float32(79.0)) + (a >= np.float32(101.0)))


@njit(nogil=True, cache=True)
def sub_scale(x, o, w, inv, sqx, sq2):
    """The float scale of the 32 values x[o:o+32] under weights w[0:32].

    Scratch, float32[LANES] each: inv, the trial inverse scales; sqx, sq2, each trial's
    sum of w q x and of w q q.
    """
    amax = F0
    mx = F0
    for j in range(SUB):
        ax = abs(x[o + j])
        if ax > amax:
            amax = ax
            mx = x[o + j]
    if amax < GROUP_MAX_EPS:
        return F0
    inv[0] = F1 / (-mx / np.float32(-127.0))
    for t in range(1, LANES):
        inv[t] = np.float32(t - 1 - NTRY - 127) / mx
    for t in range(LANES):
        sqx[t] = F0
        sq2[t] = F0
    for j in range(SUB):
        xj = x[o + j]
        wj = w[j]
        for t in range(LANES):
            q = level(inv[t] * xj)
            wq = wj * q
            sqx[t] += wq * xj
            sq2[t] += wq * q
    d = sqx[0] / sq2[0] if sq2[0] > F0 else F0
    best = d * sqx[0]
    for t in range(1, LANES):
        if sq2[t] > F0 and sqx[t] * sqx[t] > best * sq2[t]:
            d = sqx[t] / sq2[t]
            best = d * sqx[t]
    return d


@njit(nogil=True, cache=True)
def block_iq4(x, n, qw, qo, has_qw, out, scales, w, inv, sqx, sq2, L):
    """One block of n values (32: iq4_nl, 256: iq4_xs) of x into ``out``.

    qw[qo:qo+n]: the block's importance (read only when has_qw). Scratch: scales
    float32[8], the sub-blocks' float scales; w float32[32], one sub-block's weights;
    inv, sqx, sq2 float32[LANES], sub_scale's; L int32[256], the codes.
    """
    sigma2 = F0
    for j in range(n):
        sigma2 += x[j] * x[j]
    sigma2 *= np.float32(2.0 / n)
    nsub = n // SUB
    max_scale = F0
    amax_scale = F0
    for ib in range(nsub):
        o = SUB * ib
        if has_qw:
            for j in range(SUB):
                w[j] = qw[qo + o + j] * np.sqrt(sigma2 + x[o + j] * x[o + j])
        else:
            for j in range(SUB):
                w[j] = x[o + j] * x[o + j]
        d = sub_scale(x, o, w, inv, sqx, sq2)
        scales[ib] = d
        if abs(d) > amax_scale:
            amax_scale = abs(d)
            max_scale = d
    if nsub == 1:
        d = scales[0]
        put_f16(out, 0, f32_to_f16(d))
        idd = F1 / d if d != F0 else F0
        for j in range(SUB):
            L[j] = index(idd * x[j])
        q0 = 2
    else:
        d = -max_scale / np.float32(32.0)
        # an all-zero block gives d = -0.0, whose f16 ggml writes as 0x8000
        put_f16(out, 0, f32_to_f16(d) if d != F0 else 0x8000)
        idd = F1 / d if d != F0 else F0
        high = 0
        for ib in range(nsub):
            l = max(-32, min(31, nearest(idd * scales[ib])))
            dl = d * np.float32(l)
            idl = F1 / dl if dl != F0 else F0
            for j in range(SUB):
                L[SUB * ib + j] = index(idl * x[SUB * ib + j])
            l += 32
            if ib % 2 == 0:
                out[4 + ib // 2] = l & 0xF
            else:
                out[4 + ib // 2] |= (l & 0xF) << 4
            high |= (l >> 4) << (2 * ib)
        out[2] = high & 0xFF
        out[3] = high >> 8
        q0 = 8
    for i in range(nsub):
        for j in range(16):
            out[q0 + 16 * i + j] = L[SUB * i + j] | (L[SUB * i + 16 + j] << 4)


@njit(nogil=True, cache=True)
def load_span(x, r, c0, n, mode, lut, ubuf):
    """Widen n values of row r from value column c0 into ubuf as f32 bits; False if any
    is NaN or Inf. x, mode, lut as in kquant_bits.load_block (raw uint16 bit rows: mode 0
    f32, two uint16 per value, low half first; 1 f16 through lut; 2 bf16)."""
    bad = np.uint32(0)
    for i in range(n):
        if mode == 0:
            j = 2 * (c0 + i)
            b = np.uint32(x[r, j]) | (np.uint32(x[r, j + 1]) << np.uint32(16))
        elif mode == 1:
            b = lut[x[r, c0 + i]]
        else:
            b = np.uint32(x[r, c0 + i]) << np.uint32(16)
        ubuf[i] = b
        bad |= np.uint32((b & np.uint32(0x7F800000)) == np.uint32(0x7F800000))
    return bad == 0


@njit(nogil=True, cache=True)
def rows_iq4(x, mode, lut, qw, has_qw, n, out, start, end):
    """Blocks start..end-1 (row-major over (rows, blocks per row)) of n values each (32:
    iq4_nl, 256: iq4_xs) from the raw bit rows x into ``out`` (uint8 rows); returns how
    many held NaN or Inf (their bytes are left unwritten)."""
    nb = (x.shape[1] // 2 if mode == 0 else x.shape[1]) // n
    ts = out.shape[1] // nb
    ubuf = np.empty(256, np.uint32)
    xb = ubuf.view(np.float32)
    scales = np.empty(8, np.float32)
    w = np.empty(SUB, np.float32)
    inv = np.empty(LANES, np.float32)
    sqx = np.empty(LANES, np.float32)
    sq2 = np.empty(LANES, np.float32)
    L = np.empty(256, np.int32)
    bad = 0
    for blk in range(start, end):
        r = blk // nb
        b = blk - r * nb
        if not load_span(x, r, b * n, n, mode, lut, ubuf):
            bad += 1
            continue
        block_iq4(xb, n, qw, b * n, has_qw, out[r, b * ts:(b + 1) * ts], scales, w, inv,
                  sqx, sq2, L)
    return bad


# The dequantizers: gguf.quants' float32 products, in its order (iq4_xs: d times the
# signed 6-bit scale, then times the level), so the values are bit for bit its values.
# flut: f16 bits -> f32 bits as numpy converts them (NaN payloads included). They return 0
# (run_split sums what its kernels return).


@njit(nogil=True, cache=True)
def deq_iq4_nl(blocks, flut, out, start, end):
    """iq4_nl blocks start..end-1 of ``blocks`` (rows of 18-byte blocks) into ``out`` (float32 rows)."""
    nb = out.shape[1] // SUB
    for blk in range(start, end):
        r = blk // nb
        b = blk - r * nb
        q = blocks[r, NL_SIZE * b:NL_SIZE * (b + 1)]
        y = out[r, SUB * b:SUB * (b + 1)]
        d = f32_from_bits(flut[np.int64(q[0]) | (np.int64(q[1]) << 8)])
        for j in range(16):
            y[j] = d * KVALUES[q[2 + j] & 0xF]
            y[16 + j] = d * KVALUES[q[2 + j] >> 4]
    return 0


@njit(nogil=True, cache=True)
def deq_iq4_xs(blocks, flut, out, start, end):
    """iq4_xs blocks start..end-1 of ``blocks`` (rows of 136-byte blocks) into ``out`` (float32 rows)."""
    nb = out.shape[1] // 256
    for blk in range(start, end):
        r = blk // nb
        b = blk - r * nb
        q = blocks[r, XS_SIZE * b:XS_SIZE * (b + 1)]
        y = out[r, 256 * b:256 * (b + 1)]
        d = f32_from_bits(flut[np.int64(q[0]) | (np.int64(q[1]) << 8)])
        high = np.int64(q[2]) | (np.int64(q[3]) << 8)
        for ib in range(8):
            ls = ((q[4 + ib // 2] >> (4 * (ib % 2))) & 0xF) | (((high >> (2 * ib)) & 3) << 4)
            dl = d * np.float32(ls - 32)
            for j in range(16):
                y[SUB * ib + j] = dl * KVALUES[q[8 + 16 * ib + j] & 0xF]
                y[SUB * ib + 16 + j] = dl * KVALUES[q[8 + 16 * ib + j] >> 4]
    return 0
