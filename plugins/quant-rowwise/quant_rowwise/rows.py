"""Per-row schemes for the APL NPZ and Parquet V2 layouts.

- ``int{1,2,4,8}-row``: asymmetric per output row, x ~ (q - zp) * scale with
  q in [0, 2**b - 1]. By default scale and zero point minimise the row's squared error
  (:mod:`.row_search`; zp is then a float). With ``search="minmax"``: scale =
  (max - min) / (2**b - 1) (1 when the row is constant), integer zero point
  zp = clip(rint(-min / scale), 0, 2**b - 1), q = clip(rint(x / scale) + zp, 0, 2**b - 1).
- ``int8-row-sym``: scale = max|x| / 127 per row (1 for an all-zero row),
  q = clip(rint(x / scale), -127, 127) as int8, x ~ q * scale.
- ``int8-tensor``: the same with one scale for the whole tensor.

Payload: ``{"q": codes, "scales": f32 (rows,), "zero_points": f32 (rows,)}``
(symmetric schemes have no zero points; int8-tensor has one scale). Codes of fewer than 8
bits are packed per row, most significant bits first, each row padded to whole bytes:
1-bit rows are exactly ``numpy.packbits(bits, axis=-1)``; 8-bit codes are uint8
(asymmetric) or int8 (symmetric), unpacked.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import _cache  # noqa: F401  (the kernel cache, before any @njit here)


from ._input import as_rows, f32_slices, faulted_empty
from .row_search import F_LO, LLOYD_ROUNDS, N_WINDOWS, asym_mse

ASYM_BITS = (1, 2, 4, 8)


@njit(nogil=True, cache=True, parallel=True)
def _asym(x, qmax, codes, scales, zps, bad):
    for r in prange(x.shape[0]):
        lo = x[r, 0]
        hi = x[r, 0]
        for j in range(x.shape[1]):
            v = x[r, j]
            if v - v != np.float32(0.0):
                bad[0] = 1
            lo = min(lo, v)
            hi = max(hi, v)
        scale = (hi - lo) / np.float32(qmax)
        if scale == np.float32(0.0):
            scale = np.float32(1.0)
        zp = min(max(np.rint(-lo / scale), np.float32(0.0)), np.float32(qmax))
        for j in range(x.shape[1]):
            q = np.rint(x[r, j] / scale) + zp
            codes[r, j] = np.uint8(min(max(q, np.float32(0.0)), np.float32(qmax)))
        scales[r] = scale
        zps[r] = zp


@njit(nogil=True, cache=True, parallel=True)
def _sym(x, scales, codes, bad):
    """int8 codes with one given scale per row (scales already computed)."""
    for r in prange(x.shape[0]):
        s = scales[r]
        for j in range(x.shape[1]):
            v = x[r, j]
            if v - v != np.float32(0.0):
                bad[0] = 1
            q = np.rint(v / s)
            codes[r, j] = np.int8(min(max(q, np.float32(-127.0)), np.float32(127.0)))


@njit(nogil=True, cache=True, parallel=True)
def _absmax_rows(x, out):
    for r in prange(x.shape[0]):
        a = np.float32(0.0)
        for j in range(x.shape[1]):
            a = max(a, abs(x[r, j]))
        out[r] = a


@njit(nogil=True, cache=True, parallel=True)
def _pack(codes, bits, out):
    per = 8 // bits
    for r in prange(codes.shape[0]):
        for b in range(out.shape[1]):
            acc = 0
            for k in range(per):
                j = b * per + k
                if j < codes.shape[1]:
                    acc |= np.int64(codes[r, j]) << (8 - bits * (k + 1))
            out[r, b] = np.uint8(acc)


@njit(nogil=True, cache=True, parallel=True)
def _unpack(packed, bits, out):
    per = 8 // bits
    mask = (1 << bits) - 1
    for r in prange(out.shape[0]):
        for j in range(out.shape[1]):
            byte = np.int64(packed[r, j // per])
            out[r, j] = np.uint8((byte >> (8 - bits * (j % per + 1))) & mask)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """(rows, n) codes < 2**bits -> (rows, ceil(n*bits/8)) uint8, MSB first."""
    if bits == 8:
        return codes
    out = np.empty((codes.shape[0], -(-codes.shape[1] * bits // 8)), np.uint8)
    _pack(codes, bits, out)
    return out


def unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    if bits == 8:
        return packed[:, :n]
    out = np.empty((packed.shape[0], n), np.uint8)
    _unpack(np.ascontiguousarray(packed), bits, out)
    return out


SEARCHES = ("mse", "minmax")


def quantize_asym(bits: int, array: np.ndarray, search: str = "mse") -> dict[str, np.ndarray]:
    """Asymmetric per-row codes. ``search="mse"`` (the default) picks each row's scale and
    zero point by least squares (:mod:`.row_search`; the zero point is then a float);
    ``"minmax"`` is the plain formula in the module docstring."""
    if search not in SEARCHES:
        raise ValueError(f"unknown search {search!r} (expected one of {', '.join(SEARCHES)})")
    rows = as_rows(array, 1)
    qmax = (1 << bits) - 1
    codes = faulted_empty(rows.shape, np.uint8)
    scales = np.empty(rows.shape[0], np.float32)
    zps = np.empty(rows.shape[0], np.float32)
    bad = np.zeros(1, np.uint8)
    for start, part in f32_slices(rows):
        n = len(part)
        out = (codes[start:start + n], scales[start:start + n], zps[start:start + n], bad)
        if search == "mse":
            asym_mse(part, float(qmax), F_LO[bits], N_WINDOWS[bits], LLOYD_ROUNDS[bits], *out)
        else:
            _asym(part, qmax, *out)
    if bad[0]:
        raise ValueError("NaN or Inf in input")
    return {"q": pack(codes, bits), "scales": scales, "zero_points": zps}


def dequantize_asym(bits: int, data: dict[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    n = shape[-1]
    packed = np.asarray(data["q"]).reshape(-1, data["q"].shape[-1])
    codes = unpack(packed, bits, n).astype(np.float32)
    scales = np.asarray(data["scales"], np.float32).reshape(-1, 1)
    zps = np.asarray(data["zero_points"], np.float32).reshape(-1, 1)
    codes -= zps  # in place: one float32 array, not three (the same f32 operations)
    codes *= scales
    return codes.reshape(shape)


def quantize_sym(array: np.ndarray, per_tensor: bool, absmax: float | None = None) -> dict[str, np.ndarray]:
    """int8 symmetric codes and scales; ``per_tensor``: one scale, from ``absmax`` where
    given (``array`` is a piece of a tensor whose largest magnitude that is: the piece's
    codes are those rows' codes in the whole tensor's), else from ``array``'s own."""
    rows = as_rows(array, 1)
    amax = np.empty(rows.shape[0], np.float32)
    for start, part in f32_slices(rows):
        _absmax_rows(part, amax[start:start + len(part)])
    if not np.isfinite(amax).all():
        raise ValueError("NaN or Inf in input")
    if per_tensor:
        if absmax is not None:
            largest = np.float32(absmax)
            if not np.isfinite(largest) or (amax.size and amax.max() > largest):
                raise ValueError(f"option absmax {absmax} is not the tensor's largest magnitude")
        else:
            largest = amax.max() if amax.size else np.float32(0)
        amax = np.full_like(amax, largest)
    scales = amax / np.float32(127.0)
    scales[scales == 0] = 1.0
    codes = faulted_empty(rows.shape, np.int8)
    bad = np.zeros(1, np.uint8)
    for start, part in f32_slices(rows):
        _sym(part, scales[start:start + len(part)], codes[start:start + len(part)], bad)
    return {"q": codes, "scales": scales[:1].copy() if per_tensor else scales}


def dequantize_sym(data: dict[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    codes = np.asarray(data["q"]).reshape(-1, shape[-1]).astype(np.float32)
    codes *= np.asarray(data["scales"], np.float32).reshape(-1, 1)
    return codes.reshape(shape)
