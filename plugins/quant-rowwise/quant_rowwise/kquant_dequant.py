"""The k-quant dequantizers: ggml's block bytes back to float32, as gguf.quants does, or
straight to float16.

One serial kernel per block type decodes blocks start..end-1 (counted row-major over
(rows, blocks per row)) into a float32 scratch block, then stores it: as float32 (the
values gguf.quants gives, bit for bit) or as float16 rounded as numpy's
``astype(np.float16)`` rounds them (to nearest even, too large to inf), so a reader that
wants f16 never holds the float32 tensor. kquants.py runs them over runs of blocks on
threads.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from . import _cache  # noqa: F401  (the kernel cache, before any @njit here)
from ._bits import bits_from_f32
from .kquant_bits import get_f16
from ._qk import QK_K

# Output modes: the values as float32 bits (two uint16 each, low half first) or as f16.
OUT_F32, OUT_F16 = 0, 1


@njit(nogil=True, cache=True)
def f16_bits(b):
    """numpy's float32 -> float16 conversion on the bits ``b`` (uint32) of a float32:
    round to nearest even, overflow to inf, subnormals kept; a NaN stays a NaN."""
    sign = (b >> np.uint32(16)) & np.uint32(0x8000)
    a = b & np.uint32(0x7FFFFFFF)
    if a >= np.uint32(0x47800000):  # 65536 and up, inf, NaN (65520..65535 round up below)
        if a > np.uint32(0x7F800000):
            h = np.uint32(0x7C00) | ((a >> np.uint32(13)) & np.uint32(0x3FF))
            return np.uint16(sign | (h if h != np.uint32(0x7C00) else np.uint32(0x7C01)))
        return np.uint16(sign | np.uint32(0x7C00))
    if a < np.uint32(0x38800000):  # below 2**-14: an f16 subnormal or zero
        if a < np.uint32(0x33000000):
            return np.uint16(sign)
        e = a >> np.uint32(23)
        sig = (np.uint32(0x800000) | (a & np.uint32(0x7FFFFF))) >> (np.uint32(113) - e)
        # ties to even, counting the bits the shift dropped as well
        if (sig & np.uint32(0x3FFF)) != np.uint32(0x1000) or (a & np.uint32(0x7FF)) != 0:
            sig += np.uint32(0x1000)
        return np.uint16(sign | (sig >> np.uint32(13)))
    sig = a & np.uint32(0x7FFFFF)
    if (sig & np.uint32(0x3FFF)) != np.uint32(0x1000):
        sig += np.uint32(0x1000)
    # a carry out of the significand steps the exponent, up to inf: both correct
    return np.uint16(sign | (((a & np.uint32(0x7F800000)) - np.uint32(0x38000000)) >> np.uint32(13))
                     + (sig >> np.uint32(13)))


@njit(nogil=True, cache=True)
def _store(y, out, r, c0, mode):
    """The 256 values y into row r of ``out`` (uint16) from value column c0, as ``mode``.

    f16: values in f16's normal range take a branch-free rounding that vectorizes (add
    0xFFF plus the lowest kept bit, shift: round to nearest even); any other value (zero,
    subnormal, too large, inf, NaN) is redone by f16_bits."""
    if mode == OUT_F32:
        for i in range(QK_K):
            b = bits_from_f32(y[i])
            out[r, 2 * (c0 + i)] = np.uint16(b & np.uint32(0xFFFF))
            out[r, 2 * (c0 + i) + 1] = np.uint16(b >> np.uint32(16))
        return
    odd = 0
    for i in range(QK_K):
        b = bits_from_f32(y[i])
        a = b & np.uint32(0x7FFFFFFF)
        h = (a + np.uint32(0xFFF) + ((a >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13)
        out[r, c0 + i] = np.uint16(((b >> np.uint32(16)) & np.uint32(0x8000))
                                   | ((h - np.uint32(0x1C000)) & np.uint32(0xFFFF)))
        odd += (a < np.uint32(0x38800000)) | (a >= np.uint32(0x477FF000))
    if odd:
        for i in range(QK_K):
            b = bits_from_f32(y[i])
            a = b & np.uint32(0x7FFFFFFF)
            if a < np.uint32(0x38800000) or a >= np.uint32(0x477FF000):
                out[r, c0 + i] = f16_bits(b)


@njit(nogil=True, cache=True, inline="always")
def _scale_min_k4(q, o, j):
    """Sub-block j's 6-bit (scale, min) from the 12 packed bytes at q[o:o+12] (q4_K, q5_K)."""
    if j < 4:
        return q[o + j] & 63, q[o + j + 4] & 63
    return ((q[o + j + 4] & 0xF) | ((q[o + j - 4] >> 6) << 4),
            (q[o + j + 4] >> 4) | ((q[o + j] >> 6) << 4))


# The decoders: the float32 arithmetic follows gguf.quants op for op, so the values are
# equal. Each takes blocks (rows, blocks per row * type size), the output mode and
# rows ``out`` (uint16), and the run start..end-1.


@njit(nogil=True, cache=True)
def deq_q45k(blocks, five, mode, out, start, end):
    """q4_K blocks, or q5_K with ``five``."""
    ts = 176 if five else 144
    nb = blocks.shape[1] // ts
    y = np.empty(QK_K, np.float32)
    qs = 48 if five else 16
    for blk in range(start, end):
        r = blk // nb
        b = blk - r * nb
        q = blocks[r, b * ts:(b + 1) * ts]
        d = get_f16(q, 0)
        dmin = get_f16(q, 2)
        for j in range(8):
            s, m = _scale_min_k4(q, 4, j)
            dl = d * np.float32(s)
            ml = dmin * np.float32(m)
            c = j // 2
            sh = 4 * (j % 2)
            for l in range(32):
                v = (q[qs + 32 * c + l] >> sh) & 0xF
                if five:
                    v |= ((q[16 + l] >> j) & 1) << 4
                y[32 * j + l] = dl * np.float32(v) - ml
        _store(y, out, r, b * QK_K, mode)
    return 0


@njit(nogil=True, cache=True)
def deq_q6k(blocks, mode, out, start, end):
    """q6_K blocks: in each half of 128 values, value l, l+32, l+64, l+96 take the low
    nibble of ql[l], of ql[l+32], the high nibble of ql[l], of ql[l+32], each with two
    bits of qh[l] above it, and 16-value sub-blocks have int8 scales."""
    nb = blocks.shape[1] // 210
    y = np.empty(QK_K, np.float32)
    dl = np.empty(16, np.float32)
    for blk in range(start, end):
        r = blk // nb
        b = blk - r * nb
        q = blocks[r, b * 210:(b + 1) * 210]
        d = get_f16(q, 208)
        for j in range(16):
            sv = np.int32(q[192 + j])
            dl[j] = d * np.float32(sv - 256 if sv > 127 else sv)
        for h in range(2):
            for l in range(32):
                lo0 = np.int32(q[64 * h + l])
                lo1 = np.int32(q[64 * h + 32 + l])
                hb = np.int32(q[128 + 32 * h + l])
                e = 128 * h + l
                q1 = ((lo0 & 0xF) | ((hb & 3) << 4)) - 32
                q2 = ((lo1 & 0xF) | (((hb >> 2) & 3) << 4)) - 32
                q3 = ((lo0 >> 4) | (((hb >> 4) & 3) << 4)) - 32
                q4 = ((lo1 >> 4) | (((hb >> 6) & 3) << 4)) - 32
                y[e] = dl[e // 16] * np.float32(q1)
                y[e + 32] = dl[(e + 32) // 16] * np.float32(q2)
                y[e + 64] = dl[(e + 64) // 16] * np.float32(q3)
                y[e + 96] = dl[(e + 96) // 16] * np.float32(q4)
        _store(y, out, r, b * QK_K, mode)
    return 0


@njit(nogil=True, cache=True)
def deq_q3k(blocks, mode, out, start, end):
    """q3_K blocks."""
    nb = blocks.shape[1] // 110
    y = np.empty(QK_K, np.float32)
    for blk in range(start, end):
        r = blk // nb
        b = blk - r * nb
        q = blocks[r, b * 110:(b + 1) * 110]
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
        _store(y, out, r, b * QK_K, mode)
    return 0


@njit(nogil=True, cache=True)
def deq_q2k(blocks, mode, out, start, end):
    """q2_K blocks."""
    nb = blocks.shape[1] // 84
    y = np.empty(QK_K, np.float32)
    for blk in range(start, end):
        r = blk // nb
        b = blk - r * nb
        q = blocks[r, b * 84:(b + 1) * 84]
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
        _store(y, out, r, b * QK_K, mode)
    return 0
