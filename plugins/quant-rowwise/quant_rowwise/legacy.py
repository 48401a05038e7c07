"""GGUF's original block types q8_0 q4_0 q4_1 q5_0 q5_1, byte-identical to ggml's
reference quantizer (and so to gguf-py's numpy port of it).

One Numba kernel per type family reads a block, finds its scale and writes the packed
codes, reproducing the reference's float32 arithmetic step by step
(d = max/-8, then id = 1/d, trunc(x*id + 8.5); round-half-away-from-zero for q8_0) without
fastmath, so every byte matches; the f16 scales are then rounded by numpy, as the reference does.

Payload: ``{"blocks": uint8 (*shape[:-1], row_length // 32 * type_size)}``.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange


from ._input import as_rows, f32_slices

QK = 32
TYPE_SIZE = {"q8_0": 34, "q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24}
F0, F1 = np.float32(0.0), np.float32(1.0)


@njit(nogil=True, cache=True, parallel=True)
def _q8_0(x, out, d_out, bad):
    for b in prange(x.shape[0]):
        amax = F0
        for j in range(QK):
            v = x[b, j]
            if v - v != F0:  # NaN or Inf
                bad[0] = 1
            amax = max(amax, abs(v))
        d = amax / np.float32(127.0)
        idv = F1 / d if d != F0 else F0
        d_out[b] = d
        for j in range(QK):
            n = x[b, j] * idv
            a = abs(n)
            fl = np.float32(int(a))
            # round half away from zero, as the reference's floor(a) + floor(2(a - floor a))
            r = int(fl) + (1 if a - fl >= np.float32(0.5) else 0)
            out[b, 2 + j] = (-r if n < F0 else r) & 0xFF


@njit(nogil=True, cache=True, parallel=True)
def _sym(x, out, d_out, bad, divisor, offset, qmax, o):
    """q4_0 / q5_0: d = (value of largest magnitude, first if tied) / divisor,
    q = trunc(x * (1/d) + offset); q5_0's fifth bits go to bytes 2..5."""
    for b in prange(x.shape[0]):
        amax = F0
        mx = x[b, 0]
        for j in range(QK):
            v = x[b, j]
            if v - v != F0:
                bad[0] = 1
            if abs(v) > amax:
                amax = abs(v)
                mx = v
        d = mx / divisor
        idv = F1 / d if d != F0 else F0
        d_out[b] = d
        qh = 0
        for j in range(16):
            q0 = min(max(int(x[b, j] * idv + offset), 0), qmax)
            q1 = min(max(int(x[b, j + 16] * idv + offset), 0), qmax)
            out[b, o + j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4)
            qh |= ((q0 >> 4) << j) | ((q1 >> 4) << (j + 16))
        if qmax == 31:
            for k in range(4):
                out[b, 2 + k] = (qh >> (8 * k)) & 0xFF


@njit(nogil=True, cache=True, parallel=True)
def _asym(x, out, d_out, m_out, bad, levels, qmax, o):
    """q4_1 / q5_1: d = (max - min) / levels, q = trunc((x - min) * (1/d) + 0.5);
    q5_1's fifth bits go to bytes 4..7."""
    for b in prange(x.shape[0]):
        lo = x[b, 0]
        hi = x[b, 0]
        for j in range(QK):
            v = x[b, j]
            if v - v != F0:
                bad[0] = 1
            lo = min(lo, v)
            hi = max(hi, v)
        d = (hi - lo) / levels
        idv = F1 / d if d != F0 else F0
        d_out[b] = d
        m_out[b] = lo
        qh = 0
        for j in range(16):
            q0 = min(max(int((x[b, j] - lo) * idv + np.float32(0.5)), 0), qmax)
            q1 = min(max(int((x[b, j + 16] - lo) * idv + np.float32(0.5)), 0), qmax)
            out[b, o + j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4)
            qh |= ((q0 >> 4) << j) | ((q1 >> 4) << (j + 16))
        if qmax == 31:
            for k in range(4):
                out[b, 4 + k] = (qh >> (8 * k)) & 0xFF


def _put_f16(out: np.ndarray, offset: int, values: np.ndarray) -> None:
    # numpy's f32 -> f16 rounding is the reference's (ggml uses the same RNE conversion)
    out[:, offset:offset + 2] = values.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _quantize_blocks(kind: str, x: np.ndarray, out: np.ndarray, bad: np.ndarray) -> None:
    d = np.empty(x.shape[0], np.float32)
    if kind == "q8_0":
        _q8_0(x, out, d, bad)
    elif kind in ("q4_0", "q5_0"):
        q5 = kind == "q5_0"
        _sym(x, out, d, bad, np.float32(-16.0 if q5 else -8.0), np.float32(16.5 if q5 else 8.5),
             31 if q5 else 15, 6 if q5 else 2)
    else:
        q5 = kind == "q5_1"
        m = np.empty(x.shape[0], np.float32)
        _asym(x, out, d, m, bad, np.float32(31.0 if q5 else 15.0), 31 if q5 else 15, 8 if q5 else 4)
        _put_f16(out, 2, m)
    _put_f16(out, 0, d)


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
