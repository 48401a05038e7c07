"""GGUF's original block types q8_0 q4_0 q4_1 q5_0 q5_1, byte-identical to ggml's
reference quantizer (and so to gguf-py's numpy port of it).

One Numba kernel per type family reads a block, finds its scale and writes the packed
codes, reproducing the reference's float32 arithmetic step by step
(d = max/-8, then id = 1/d, trunc(x*id + 8.5); round-half-away-from-zero for q8_0) without
fastmath, so every byte matches; the f16 scales are rounded to nearest even from their
float32 bits inside the kernel, as the reference's conversion rounds them.

One difference from gguf-py, none from ggml's C reference: in a q4_1/q5_1 block whose min
is a zero met with both signs, the min's f16 sign is that of the first zero (as the C loop
keeps it); numpy's SIMD min keeps whichever its lane order gives, which varies by CPU.
The dequantized values are the same either way.

With an importance matrix (``weights``, one per column) q4_0 q4_1 q5_0 q5_1 are coded by
llama.cpp's importance-aware searches instead (``legacy_imatrix``); q8_0 ignores it, as
llama.cpp's does.

Payload: ``{"blocks": uint8 (*shape[:-1], row_length // 32 * type_size)}``.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import _cache  # noqa: F401  (the kernel cache, before any @njit here)
from ._bits import bits_from_f32, f32_from_bits
from ._compile import ensure
from ._input import as_rows, f32_slices, faulted_empty
from .kquant_importance import importance

QK = 32
TYPE_SIZE = {"q8_0": 34, "q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24}
F0, F1 = np.float32(0.0), np.float32(1.0)


@njit(nogil=True, cache=True, inline="always")
def _f16(bits, a):
    """IEEE half bits of the float32 with bits ``bits`` and magnitude ``a``, rounded to
    nearest even, overflowing to inf: the same conversion as numpy's astype(float16)."""
    sign = (bits >> np.uint32(16)) & np.uint32(0x8000)
    x = bits & np.uint32(0x7FFFFFFF)
    if x >= np.uint32(0x7F800000):  # inf or NaN
        h = np.uint32(0x7C00) | (np.uint32(0x200) if x > np.uint32(0x7F800000) else np.uint32(0))
    elif x >= np.uint32(0x477FF000):  # rounds past 65504
        h = np.uint32(0x7C00)
    elif x < np.uint32(0x38800000):  # below 2**-14: a multiple of 2**-24, rounded exactly
        h = np.uint32(np.rint(a * np.float32(16777216.0)))
    else:
        x = x + np.uint32(0x0FFF) + ((x >> np.uint32(13)) & np.uint32(1))
        h = (x - np.uint32(0x38000000)) >> np.uint32(13)
    return sign | h


# Kernels index one block through 1-D views (xb: float32, ib: its uint32 bits; ob: the
# output block), which lets LLVM vectorise the per-value loops. Block maxima are integer
# reductions over the bits (for non-negative floats the bit patterns order as the values
# do), which vectorise where float max/min without fast-math stay scalar; NaN and Inf show
# up as magnitude bits >= 0x7F800000 in the same reduction.

ABS = np.uint32(0x7FFFFFFF)
SIGN = np.uint32(0x80000000)
EXP_ALL = np.uint32(0x7F800000)  # magnitude bits of Inf; NaN's are above
# |n| rounded half away from zero is trunc(|n| + HALF_DOWN), HALF_DOWN the float just
# below 0.5: the same as the reference's floor(a) + floor(2 (a - floor a)) for every float
# in [0, 128.5] (checked exhaustively), one add and one round instead of two floors.
HALF_DOWN = np.float32(0.49999997)
U32 = np.uint32
ALL = np.uint32(0xFFFFFFFF)
# Numba widens uint32 & uint32 to uint64; the U32(...) casts keep the reductions at 32 bits,
# which with these select forms LLVM vectorises (without them it does not).


@njit(nogil=True, cache=True, inline="always")
def _magnitudes(ib):
    """(largest magnitude bits among the non-negative values, among the negative ones)."""
    mp = U32(0)
    mn = U32(0)
    for j in range(QK):
        v = ib[j]
        a = U32(v & ABS)
        mp = max(mp, a if v < SIGN else U32(0))
        mn = max(mn, a if v >= SIGN else U32(0))
    return mp, mn


@njit(nogil=True, cache=True, inline="always")
def _store_f16(ob, o, value):
    h = _f16(bits_from_f32(value), abs(value))
    ob[o] = h & np.uint32(0xFF)  # the callers' ob may be int8: stores truncate, same bytes
    ob[o + 1] = h >> np.uint32(8)


@njit(nogil=True, cache=True, parallel=True)
def blocks_q8_0(x, xi, out, flags):
    """q8_0 blocks of the float32 blocks ``x`` (``xi``: their bits) into ``out`` (int8
    rows of 34); flags[0] = 1 on NaN or Inf."""
    for b in prange(x.shape[0]):
        xb = x[b]
        ib = xi[b]
        ob = out[b]
        mp, mn = _magnitudes(ib)
        m = max(mp, mn)  # no sign needed: q8_0's d is |x|max / 127
        if m >= EXP_ALL:
            flags[0] = 1
        d = f32_from_bits(np.uint32(m)) / np.float32(127.0)
        idv = F1 / d if d != F0 else F0
        _store_f16(ob, 0, d)
        for j in range(QK):
            n = xb[j] * idv
            r = np.trunc(abs(n) + HALF_DOWN)
            ob[2 + j] = np.int8(-r if n < F0 else r)


# The q4/q5 kernels take the width as an argument (q5: False for q4_0/q4_1), so one
# compiled kernel serves both. All kernels are module-level functions that close over
# nothing: Numba keys a closure's cache entry on its closed-over values, and a kernel
# closed over other kernels gets a new key in every process, so it never loads from the
# cache.


@njit(nogil=True, cache=True, inline="always")
def _write(xb, ob, o, lo, idv, offset, q5):
    """One q4/q5 block's codes at ob[o:], given 1/d and the offset added before
    truncation (with the block's min ``lo`` subtracted for q4_1/q5_1): low nibbles of
    values j and j+16 share a byte; q5's fifth bits go to the 4 bytes before them."""
    if not q5:
        fq = np.float32(15.0)
        for j in range(16):
            q0 = np.uint8(min(max(np.trunc((xb[j] - lo) * idv + offset), F0), fq))
            q1 = np.uint8(min(max(np.trunc((xb[j + 16] - lo) * idv + offset), F0), fq))
            ob[o + j] = q0 | (q1 << np.uint8(4))
    else:
        fq = np.float32(31.0)
        qh = U32(0)
        for j in range(16):
            q0 = U32(min(max(np.trunc((xb[j] - lo) * idv + offset), F0), fq))
            q1 = U32(min(max(np.trunc((xb[j + 16] - lo) * idv + offset), F0), fq))
            ob[o + j] = np.uint8(U32(q0 & U32(0x0F)) | U32(U32(q1 & U32(0x0F)) << U32(4)))
            qh |= U32(U32(U32(q0 >> U32(4)) << U32(j)) | U32(U32(q1 >> U32(4)) << U32(j + 16)))
        for k in range(4):
            ob[o - 4 + k] = np.uint8(U32(qh >> U32(8 * k)) & U32(0xFF))


# Blocks whose scale depends on the order the values are met in (a tie for the largest
# magnitude in q4_0/q5_0, a min or max that is a zero of either sign in q4_1/q5_1) are
# rare; a kernel's main loop writes them as if there were no tie and raises flags[1], and
# a second, scalar loop then rewrites just those blocks the reference's way. Keeping the
# order-dependent search out of the main loop lets LLVM vectorise it.


@njit(nogil=True, cache=True, inline="always")
def _sym_block(xb, ob, mx, q5):
    """d = mx / -8 (q5: / -16), q = trunc(x * (1/d) + 8.5 (q5: 16.5))."""
    d = mx / (np.float32(-16.0) if q5 else np.float32(-8.0))
    idv = F1 / d if d != F0 else F0
    _store_f16(ob, 0, d)
    _write(xb, ob, 6 if q5 else 2, F0, idv, np.float32(16.5) if q5 else np.float32(8.5), q5)


@njit(nogil=True, cache=True, parallel=True)
def blocks_sym(x, xi, out, flags, q5):
    """q4_0 (q5 False) or q5_0 blocks of the float32 blocks ``x`` (``xi``: their bits)
    into ``out`` (uint8 rows of 18 or 22); d from the value of largest magnitude, the
    first if tied. flags[0] = 1 on NaN or Inf; flags[1] is the kernel's own (a tie met)."""
    flags[1] = 0
    for b in prange(x.shape[0]):
        mp, mn = _magnitudes(xi[b])
        if max(mp, mn) >= EXP_ALL:
            flags[0] = 1
        if mp == mn:
            flags[1] = 1
        _sym_block(x[b], out[b], f32_from_bits(mp) if mp > mn else -f32_from_bits(mn), q5)
    if flags[1]:
        for b in prange(x.shape[0]):
            ib = xi[b]
            mp, mn = _magnitudes(ib)
            if mp == mn:  # the first value of the largest magnitude, as argmax picks it
                xb = x[b]
                mx = xb[0]
                for j in range(QK):
                    if U32(ib[j] & ABS) == mp:
                        mx = xb[j]
                        break
                _sym_block(xb, out[b], mx, q5)


@njit(nogil=True, cache=True, inline="always")
def _min_block(xb, ob, lo, hi, q5):
    """d = (max - min) / 15 (q5: / 31), q = trunc((x - min) * (1/d) + 0.5)."""
    d = (hi - lo) / (np.float32(31.0) if q5 else np.float32(15.0))
    idv = F1 / d if d != F0 else F0
    _store_f16(ob, 0, d)
    _store_f16(ob, 2, lo)
    _write(xb, ob, 8 if q5 else 4, lo, idv, np.float32(0.5), q5)


@njit(nogil=True, cache=True, parallel=True)
def blocks_min(x, xi, out, flags, q5):
    """q4_1 (q5 False) or q5_1 blocks of the float32 blocks ``x`` (``xi``: their bits)
    into ``out`` (uint8 rows of 20 or 24); flags as blocks_sym's (flags[1]: a min or max
    that is a zero)."""
    flags[1] = 0
    for b in prange(x.shape[0]):
        ib = xi[b]
        # min and max through order-preserving keys: flip the sign bit of non-negative
        # values and every bit of negative ones; NaN/Inf through the magnitudes' max
        kmin = ALL
        kmax = U32(0)
        m = U32(0)
        for j in range(QK):
            v = ib[j]
            k = U32(v ^ (ALL if v >= SIGN else SIGN))
            kmin = min(kmin, k)
            kmax = max(kmax, k)
            m = max(m, U32(v & ABS))
        if m >= EXP_ALL:
            flags[0] = 1
        if kmin >= ABS and kmin <= SIGN or kmax >= ABS and kmax <= SIGN:
            flags[1] = 1  # -0 (key 0x7FFFFFFF) or +0 (key 0x80000000)
        lo = f32_from_bits(U32(kmin ^ (SIGN if kmin >= SIGN else ALL)))
        hi = f32_from_bits(U32(kmax ^ (SIGN if kmax >= SIGN else ALL)))
        _min_block(x[b], out[b], lo, hi, q5)
    if flags[1]:
        for b in prange(x.shape[0]):
            xb = x[b]
            lo = xb[0]
            hi = xb[0]
            for j in range(QK):  # the first of +0 and -0 met, as ggml's reference loop
                v = xb[j]
                lo = v if v < lo else lo
                hi = v if v > hi else hi
            if lo == F0 or hi == F0:
                _min_block(xb, out[b], lo, hi, q5)


def _quantize_blocks(kind: str, x: np.ndarray, out: np.ndarray, flags: np.ndarray) -> None:
    x = x.view()
    x.flags.writeable = False  # a new view: one kernel type, whatever the caller's array
    xi = x.view(np.uint32)
    if kind == "q8_0":
        blocks_q8_0(x, xi, out.view(np.int8), flags)
    elif kind in ("q4_0", "q5_0"):
        blocks_sym(x, xi, out, flags, kind == "q5_0")
    else:
        blocks_min(x, xi, out, flags, kind == "q5_1")


def quantize(kind: str, array: np.ndarray, weights=None,
             refine: bool = True) -> dict[str, np.ndarray]:
    """``kind`` blocks of ``array`` (f32/f16/bf16, rows of a multiple of 32 values); with
    ``weights`` (importance per column, shape ``(row_length,)``) q4_0..q5_1 use llama.cpp's
    importance-aware search (``refine``: then lowered further, see legacy_imatrix).

    :raises ValueError: on NaN or Inf, a bad row length or dtype, weights of another shape
        than ``(row_length,)`` or non-finite or negative ones.
    """
    rows = as_rows(array, QK)
    if weights is not None:
        qw = importance(weights, rows.shape[1], kind)
        if kind != "q8_0":
            from .legacy_imatrix import quantize as quantize_weighted

            return {"blocks": quantize_weighted(kind, array, qw, refine)}
    size = TYPE_SIZE[kind]
    row_bytes = rows.shape[1] // QK * size
    out = faulted_empty((rows.shape[0], row_bytes), np.uint8)
    flags = np.zeros(2, np.uint8)  # [NaN or Inf met, a block needs the second pass]
    if rows.size:
        ensure([kind], (False,))  # from the kernel cache, or compiled into it first
    for start, part in f32_slices(rows):
        n = len(part)
        _quantize_blocks(kind, part.reshape(-1, QK), out[start:start + n].reshape(-1, size), flags)
    if flags[0]:
        raise ValueError("NaN or Inf in input")
    return {"blocks": out.reshape(*array.shape[:-1], row_bytes)}


def dequantize(kind: str, data: dict[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    # a block scale that is Inf or NaN (a damaged file) gives NaN quietly: the pipeline
    # names non-finite weights itself, and a numpy warning on stderr would break the
    # CLI's one-line error
    with np.errstate(invalid="ignore", over="ignore"):
        return _dequantize(kind, data, shape)


def _dequantize(kind: str, data: dict[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    blocks = np.ascontiguousarray(data["blocks"]).reshape(-1, TYPE_SIZE[kind])
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    if kind == "q8_0":
        x = blocks[:, 2:].view(np.int8).astype(np.float32) * d
    else:
        has_min = kind in ("q4_1", "q5_1")
        off = 4 if has_min else 2
        qh = None
        if kind in ("q5_0", "q5_1"):
            qh = np.unpackbits(blocks[:, off:off + 4], axis=-1, bitorder="little")
            off += 4
        nib = blocks[:, off:off + 16]
        q = np.concatenate([nib & 0x0F, nib >> 4], axis=1).astype(np.float32)
        if qh is not None:
            q += qh.astype(np.float32) * 16
        if has_min:
            x = q * d + blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        else:
            x = (q - (8 if kind == "q4_0" else 16)) * d
    return x.reshape(shape).astype(np.float32, copy=False)
