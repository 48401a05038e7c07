"""Bit-level helpers of the k-quant kernels: f16 <-> f32 conversion and the 2-byte f16
fields of a block, ggml's rounding to the nearest integer, and widening one 256-weight
block of raw input bits (f32, f16 or bf16) to float32 bits.

The f32 -> f16 conversion here saturates at 65504 where numpy's (and legacy.py's) gives
inf: a k-quant super-scale too large for f16 is clamped, so the block stays finite.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from . import _cache  # noqa: F401  (the kernel cache, before any @njit here)
from ._qk import QK_K

F0 = np.float32(0.0)
F1 = np.float32(1.0)
# The fast-math flags of the float32 kernels: reassociation and contraction let LLVM
# vectorize their sums; no nnan/ninf, so the kernels' NaN guards keep working.
FM = {"reassoc", "contract", "arcp", "nsz"}


@njit(nogil=True, cache=True, inline="always")
def f16_to_f32(h):
    """The float32 value of the f16 bits ``h``."""
    s = (h >> 15) & 1
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = np.float64(m) * 5.960464477539063e-08  # 2**-24
    elif e == 31:
        v = np.inf if m == 0 else np.nan
    else:
        v = math.ldexp(np.float64(m + 1024), e - 25)
    if s:
        v = -v
    return np.float32(v)


@njit(nogil=True, cache=True, inline="always")
def f32_to_f16(f):
    """Round-to-nearest-even f32 -> f16 bits; saturates at 65504 instead of giving inf."""
    a = abs(np.float64(f))
    sign = 0x8000 if f < 0 else 0
    if a != a:
        return 0x7E00
    if a >= 65504.0:
        return sign | 0x7BFF
    if a < 6.103515625e-05:  # below 2**-14: subnormal
        return sign | int(np.rint(a * 16777216.0))
    fr, e = math.frexp(a)
    ex = e - 1
    mant = int(np.rint((fr * 2.0 - 1.0) * 1024.0))
    if mant == 1024:
        mant = 0
        ex += 1
    if ex + 15 >= 31:
        return sign | 0x7BFF
    return sign | ((ex + 15) << 10) | mant


@njit(nogil=True, cache=True, fastmath=FM, inline="always")
def rint_clamp(v, lo, hi):
    """ggml's nearest_int (round half to even) clamped to [lo, hi]; NaN -> lo."""
    r = np.rint(v)
    r = r if r >= lo else lo  # NaN compares false: -> lo
    return int(r if r <= hi else hi)


@njit(nogil=True, cache=True, inline="always")
def nearest(v):
    """ggml's nearest_int: round half to even, as an int (NaN -> 0, huge values clamped)."""
    r = np.rint(v)
    if r > 4194303.0:
        return 4194303
    if r < -4194303.0:
        return -4194303
    if r != r:
        return 0
    return int(r)


@njit(nogil=True, cache=True, fastmath=FM)
def load_block(x, r, c0, mode, lut, ubuf):
    """Widen one 256-weight block of row ``r`` into ``ubuf`` as f32 bits; False if non-finite.

    x: the raw input bits as uint16 rows, whatever the input type (one compiled kernel for
    all three): mode 0 f32 (each value two uint16, low half first), 1 f16 bits through
    ``lut`` (f16 bits -> f32 bits), 2 bf16 bits (the top half of an f32); c0: the first
    value's column in values, not uint16s.
    """
    bad = np.uint32(0)
    if mode == 0:
        for i in range(QK_K):
            j = 2 * (c0 + i)
            b = np.uint32(x[r, j]) | (np.uint32(x[r, j + 1]) << np.uint32(16))
            ubuf[i] = b
            bad |= np.uint32((b & np.uint32(0x7F800000)) == np.uint32(0x7F800000))
    elif mode == 1:
        for i in range(QK_K):
            b = lut[x[r, c0 + i]]
            ubuf[i] = b
            bad |= np.uint32((b & np.uint32(0x7F800000)) == np.uint32(0x7F800000))
    else:
        for i in range(QK_K):
            b = np.uint32(x[r, c0 + i]) << np.uint32(16)
            ubuf[i] = b
            bad |= np.uint32((b & np.uint32(0x7F800000)) == np.uint32(0x7F800000))
    return bad == 0


@njit(nogil=True, cache=True, fastmath=FM)
def load_values(x, r, c0, n, mode, lut, ubuf):
    """load_block for any ``n`` values: row ``r``'s values c0..c0+n-1 into ubuf[0:n] as
    f32 bits; False if one is not finite."""
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
def put_f16(out, o, h):
    """Store the f16 bits ``h`` little-endian at out[o:o+2]."""
    out[o] = h & 0xFF
    out[o + 1] = (h >> 8) & 0xFF


@njit(nogil=True, cache=True, inline="always")
def get_f16(q, o):
    """The float32 value of the little-endian f16 at q[o:o+2]."""
    return f16_to_f32(np.int32(q[o]) | (np.int32(q[o + 1]) << 8))


# Bytes of the scratch buffer a row driver cuts its arrays from (q6_K's, the largest,
# needs about 13 KB).
ARENA = 32768


@njit(nogil=True, cache=True)
def arena():
    """A zeroed scratch buffer of ARENA bytes whose data starts on a 64-byte boundary.

    The kernels' float sums are vectorized with reassociation, and LLVM guards such a
    loop with run-time checks (do two arrays overlap, where does the data start) that pick
    the vector or the scalar form, which round differently. With every scratch array
    cut from one aligned buffer at fixed offsets, the checks, and so a
    block's bytes, come out the same on every thread and every run; separate np.zeros
    arrays lay out differently per thread and made the output vary between runs.
    """
    buf = np.zeros(ARENA + 64, np.uint8)
    off = (64 - buf.ctypes.data % 64) % 64
    return buf[off:off + ARENA]
