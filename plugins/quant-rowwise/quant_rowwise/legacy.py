"""GGUF's original block types q8_0 q4_0 q4_1 q5_0 q5_1, byte-identical to ggml's
reference quantizer (and so to gguf-py's numpy port of it).

One Numba kernel per type family reads a block, finds its scale and writes the packed
codes, reproducing the reference's float32 arithmetic step by step
(d = max/-8, then id = 1/d, trunc(x*id + 8.5); round-half-away-from-zero for q8_0) without
fastmath, so every byte matches; the f16 scales are rounded to nearest even from their
float32 bits inside the kernel, as the reference's conversion rounds them.

Payload: ``{"blocks": uint8 (*shape[:-1], row_length // 32 * type_size)}``.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange


from ._input import as_rows, f32_slices

QK = 32
TYPE_SIZE = {"q8_0": 34, "q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24}
F0, F1 = np.float32(0.0), np.float32(1.0)


FMAX = np.float32(3.4028235e38)


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


@njit(nogil=True, cache=True, inline="always")
def _put_f16(ob, o, bits, a):
    h = _f16(bits, a)
    ob[o] = np.uint8(h & np.uint32(0xFF))
    ob[o + 1] = np.uint8(h >> np.uint32(8))

# Kernels index one block through 1-D views (xb, ob): that lets LLVM vectorise the
# per-value loops, about twice as fast as 2-D indexing. Non-finite values are flagged
# with an integer OR (a <= FMAX is false for NaN and Inf), which vectorises too.


@njit(nogil=True, cache=True, parallel=True)
def _q8_0(x, out, d_out, dbits, bad):
    for b in prange(x.shape[0]):
        xb = x[b]
        ob = out[b]
        amax = F0
        nf = 0
        for j in range(QK):
            a = abs(xb[j])
            nf |= 0 if a <= FMAX else 1
            amax = a if a > amax else amax
        if nf:
            bad[0] = 1
        d = amax / np.float32(127.0)
        idv = F1 / d if d != F0 else F0
        d_out[b] = d
        h = _f16(dbits[b], abs(d))
        ob[0] = np.int8(h & np.uint32(0xFF))  # truncating stores: the same bytes as uint8
        ob[1] = np.int8(h >> np.uint32(8))
        for j in range(QK):
            n = xb[j] * idv
            a = abs(n)
            fl = np.floor(a)
            # round half away from zero, exactly as the reference: floor(a) + floor(2(a - floor a))
            r = fl + np.floor(np.float32(2.0) * (a - fl))
            ob[2 + j] = np.int8(-r if n < F0 else r)


def _make_sym(q5: bool):
    """The q4_0 or q5_0 kernel: d = (value of largest magnitude, first if tied) / divisor,
    q = trunc(x * (1/d) + offset); q5_0's fifth bits go to bytes 2..5. The constants are
    closed over, so Numba compiles them in (about 1.4x faster than passing them)."""
    divisor = np.float32(-16.0 if q5 else -8.0)
    offset = np.float32(16.5 if q5 else 8.5)
    qmax = 31 if q5 else 15
    fq = np.float32(qmax)
    o = 6 if q5 else 2

    @njit(nogil=True, cache=True, parallel=True)
    def kernel(x, out, d_out, dbits, bad):
        for b in prange(x.shape[0]):
            xb = x[b]
            ob = out[b]
            lo = xb[0]
            hi = xb[0]
            nf = 0
            for j in range(QK):
                v = xb[j]
                nf |= 0 if abs(v) <= FMAX else 1
                lo = v if v < lo else lo
                hi = v if v > hi else hi
            if nf:
                bad[0] = 1
            # the value of largest magnitude; on a tie (-lo == hi) the first one, as argmax
            mx = hi if hi > -lo else lo
            if hi == -lo:
                for j in range(QK):
                    if abs(xb[j]) == hi:
                        mx = xb[j]
                        break
            d = mx / divisor
            idv = F1 / d if d != F0 else F0
            d_out[b] = d
            _put_f16(ob, 0, dbits[b], abs(d))
            if qmax == 15:
                for j in range(16):
                    q0 = np.uint8(min(max(np.trunc(xb[j] * idv + offset), F0), fq))
                    q1 = np.uint8(min(max(np.trunc(xb[j + 16] * idv + offset), F0), fq))
                    ob[o + j] = q0 | (q1 << np.uint8(4))
            else:
                qh = np.uint32(0)
                for j in range(16):
                    q0 = np.uint32(min(max(np.trunc(xb[j] * idv + offset), F0), fq))
                    q1 = np.uint32(min(max(np.trunc(xb[j + 16] * idv + offset), F0), fq))
                    ob[o + j] = np.uint8((q0 & np.uint32(0x0F)) | ((q1 & np.uint32(0x0F)) << np.uint32(4)))
                    qh |= ((q0 >> np.uint32(4)) << np.uint32(j)) | ((q1 >> np.uint32(4)) << np.uint32(j + 16))
                for k in range(4):
                    ob[2 + k] = np.uint8((qh >> np.uint32(8 * k)) & np.uint32(0xFF))

    return kernel


def _make_asym(q5: bool):
    """The q4_1 or q5_1 kernel: d = (max - min) / levels, q = trunc((x - min) * (1/d) + 0.5);
    q5_1's fifth bits go to bytes 4..7 (constants closed over, as in _make_sym)."""
    levels = np.float32(31.0 if q5 else 15.0)
    qmax = 31 if q5 else 15
    fq = np.float32(qmax)
    o = 8 if q5 else 4

    @njit(nogil=True, cache=True, parallel=True)
    def kernel(x, out, d_out, m_out, dbits, mbits, bad):
        for b in prange(x.shape[0]):
            xb = x[b]
            ob = out[b]
            lo = xb[0]
            hi = xb[0]
            nf = 0
            for j in range(QK):
                v = xb[j]
                nf |= 0 if abs(v) <= FMAX else 1
                lo = v if v < lo else lo
                hi = v if v > hi else hi
            if nf:
                bad[0] = 1
            d = (hi - lo) / levels
            idv = F1 / d if d != F0 else F0
            d_out[b] = d
            m_out[b] = lo
            _put_f16(ob, 0, dbits[b], abs(d))
            _put_f16(ob, 2, mbits[b], abs(lo))
            if qmax == 15:
                for j in range(16):
                    q0 = np.uint8(min(max(np.trunc((xb[j] - lo) * idv + np.float32(0.5)), F0), fq))
                    q1 = np.uint8(min(max(np.trunc((xb[j + 16] - lo) * idv + np.float32(0.5)), F0), fq))
                    ob[o + j] = q0 | (q1 << np.uint8(4))
            else:
                qh = np.uint32(0)
                for j in range(16):
                    q0 = np.uint32(min(max(np.trunc((xb[j] - lo) * idv + np.float32(0.5)), F0), fq))
                    q1 = np.uint32(min(max(np.trunc((xb[j + 16] - lo) * idv + np.float32(0.5)), F0), fq))
                    ob[o + j] = np.uint8((q0 & np.uint32(0x0F)) | ((q1 & np.uint32(0x0F)) << np.uint32(4)))
                    qh |= ((q0 >> np.uint32(4)) << np.uint32(j)) | ((q1 >> np.uint32(4)) << np.uint32(j + 16))
                for k in range(4):
                    ob[4 + k] = np.uint8((qh >> np.uint32(8 * k)) & np.uint32(0xFF))

    return kernel


_q4_0, _q5_0 = _make_sym(False), _make_sym(True)
_q4_1, _q5_1 = _make_asym(False), _make_asym(True)


def _quantize_blocks(kind: str, x: np.ndarray, out: np.ndarray, bad: np.ndarray) -> None:
    d = np.empty(x.shape[0], np.float32)  # the kernels read the bits back to round to f16
    if kind == "q8_0":
        _q8_0(x, out.view(np.int8), d, d.view(np.uint32), bad)
    elif kind in ("q4_0", "q5_0"):
        (_q5_0 if kind == "q5_0" else _q4_0)(x, out, d, d.view(np.uint32), bad)
    else:
        m = np.empty(x.shape[0], np.float32)
        (_q5_1 if kind == "q5_1" else _q4_1)(x, out, d, m, d.view(np.uint32), m.view(np.uint32), bad)


def quantize(kind: str, array: np.ndarray) -> dict[str, np.ndarray]:
    rows = as_rows(array, QK)
    size = TYPE_SIZE[kind]
    row_bytes = rows.shape[1] // QK * size
    out = np.empty((rows.shape[0], row_bytes), np.uint8)
    bad = np.zeros(1, np.uint8)
    for start, part in f32_slices(rows):
        n = len(part)
        _quantize_blocks(kind, part.reshape(-1, QK), out[start:start + n].reshape(-1, size), bad)
    if bad[0]:
        raise ValueError("NaN or Inf in input")
    return {"blocks": out.reshape(*array.shape[:-1], row_bytes)}


def dequantize(kind: str, data: dict[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
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
