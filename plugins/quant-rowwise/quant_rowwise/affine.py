"""MLX's affine group quantization, ``int{2,3,4,5,6,8}-g{32,64,128}``, identical to
``mlx.core.quantize(w, group_size, bits)``.

Per group of ``g`` values along the row, in float32 (n = 2**bits - 1):
the end of larger magnitude is the edge; scale = max((max - min)/n, 1e-7), negated when
the edge is the max; q0 = rint(edge/scale); if q0 != 0 the scale is refit to edge/q0 and
the bias is the edge, else the bias is 0; q = clip(rint((w - bias)/scale), 0, n).
Codes are packed LSB-first as one little-endian bit stream into uint32 words (3-, 5- and
6-bit codes straddle words); scales and biases are cast to the input's dtype.

Payload: ``{"weight": uint32 (*rows, row*bits/32), "scales": (*rows, row/g),
"biases": (*rows, row/g)}``; dequantized value = scale * q + bias.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import _cache  # noqa: F401  (the kernel cache, before any @njit here)

import convcore

from ._input import as_rows, f32_slices, faulted_empty

BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)
EPS = np.float32(1e-7)


@njit(nogil=True, cache=True, parallel=True)
def _quantize(x, bits, words, scales, biases, bad):
    """x: (n_groups, g) float32 -> words (n_groups, g*bits/32), scales, biases (f32)."""
    g = x.shape[1]
    n = np.float32((1 << bits) - 1)
    for k in prange(x.shape[0]):
        lo = x[k, 0]
        hi = x[k, 0]
        for j in range(g):
            v = x[k, j]
            if v - v != np.float32(0.0):
                bad[0] = 1
            lo = min(lo, v)
            hi = max(hi, v)
        edge_is_min = abs(lo) > abs(hi)
        scale = max((hi - lo) / n, EPS)
        if not edge_is_min:
            scale = -scale
        edge = lo if edge_is_min else hi
        q0 = np.rint(edge / scale)
        bias = np.float32(0.0)
        if q0 != np.float32(0.0):
            scale = edge / q0
            bias = edge
        scales[k] = scale
        biases[k] = bias
        acc = np.uint64(0)
        filled = 0
        w = 0
        for j in range(g):
            q = np.rint((x[k, j] - bias) / scale)
            q = min(max(q, np.float32(0.0)), n)
            acc |= np.uint64(int(q)) << np.uint64(filled)
            filled += bits
            if filled >= 32:
                words[k, w] = np.uint32(acc & np.uint64(0xFFFFFFFF))
                w += 1
                acc >>= np.uint64(32)
                filled -= 32


@njit(nogil=True, cache=True, parallel=True)
def _unpack(words, bits, out):
    """Codes of each group, as float32 (n_groups, g)."""
    g = out.shape[1]
    mask = np.uint64((1 << bits) - 1)
    for k in prange(out.shape[0]):
        acc = np.uint64(0)
        filled = 0
        w = 0
        for j in range(g):
            if filled < bits:
                acc |= np.uint64(words[k, w]) << np.uint64(filled)
                w += 1
                filled += 32
            out[k, j] = np.float32(acc & mask)
            acc >>= np.uint64(bits)
            filled -= bits


def quantize(bits: int, group: int, array: np.ndarray) -> dict[str, np.ndarray]:
    rows = as_rows(array, group)
    n_rows, length = rows.shape
    per_row_groups = length // group
    words = faulted_empty((n_rows, length * bits // 32), np.uint32)
    scales = np.empty((n_rows, per_row_groups), np.float32)
    biases = np.empty((n_rows, per_row_groups), np.float32)
    bad = np.zeros(1, np.uint8)
    for start, part in f32_slices(rows):
        n = len(part)
        _quantize(part.reshape(-1, group), bits, words[start:start + n].reshape(-1, group * bits // 32),
                  scales[start:start + n].reshape(-1), biases[start:start + n].reshape(-1), bad)
    if bad[0]:
        raise ValueError("NaN or Inf in input")
    lead = array.shape[:-1]
    dtype = array.dtype if array.dtype != np.float64 else np.dtype(np.float32)
    return {"weight": words.reshape(*lead, -1),
            "scales": convcore.cast(scales, convcore.dtype_name(dtype)).reshape(*lead, -1),
            "biases": convcore.cast(biases, convcore.dtype_name(dtype)).reshape(*lead, -1)}


def dequantize(bits: int, group: int, data: dict[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """``scale * q + bias`` as ``mx.dequantize`` computes it: in the scales' dtype, the
    product and the sum each rounded to it; returned as float32 (exact)."""
    words = np.ascontiguousarray(data["weight"]).reshape(-1, group * bits // 32)
    scales, biases = np.asarray(data["scales"]), np.asarray(data["biases"])
    n_groups = scales.size
    if words.shape[0] != n_groups or n_groups * group != int(np.prod(shape)):
        raise ValueError(f"packed data does not fit shape {list(shape)} at {bits} bits, group {group}")
    q = np.empty((n_groups, group), np.float32)
    _unpack(words, bits, q)
    dtype = convcore.dtype_name(scales.dtype)
    s32 = scales.reshape(-1, 1).astype(np.float32)
    b32 = biases.reshape(-1, 1).astype(np.float32)
    q *= s32
    if dtype != "f32":
        q = convcore.cast(convcore.cast(q, dtype), "f32")
    q += b32
    if dtype != "f32":
        q = convcore.cast(convcore.cast(q, dtype), "f32")
    return q.reshape(shape)
