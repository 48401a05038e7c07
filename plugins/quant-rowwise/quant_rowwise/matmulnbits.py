"""ONNX Runtime ``MatMulNBits`` block quantization, ``int{4,8}-b{16,32,64,128,256}[-asym]``,
byte-identical to onnxruntime's own quantizer (``quantize_matmul_4bits`` /
``quantize_matmul_8bits`` of ``onnxruntime.capi._pybind_state``, which
``onnxruntime.quantization.matmul_nbits_quantizer`` and so onnxruntime-genai's model
builder call), as its Python caller allocates and fills the buffers.

The input's last axis is the row (a linear layer's HF weight ``[N, K]``; ORT's B is its
transpose ``[K, N]``, quantized per column in blocks along K: the same blocks). Each
block of ``block`` consecutive values of a row (the last one may be shorter: K need not
be a multiple of the block), in float32 arithmetic, without fastmath, b = bits,
mid = 2**(b-1), qmax = 2**b - 1:

- the block's min and max, as ORT's in-order scan finds them (``if v < lo: lo = v``,
  ``if v > hi: hi = v``, from +-FLT_MAX; the kernel uses vectorised integer reductions,
  which differ from that scan only in the sign of a zero lo or hi: that matters only for
  an all-zero symmetric block, whose scale is then -first value / mid, -0.0 or +0.0);
- symmetric: m = hi if |hi| > |lo| else lo (a tie in magnitude takes the min);
  scale = -m / mid (so m maps to -mid, i.e. code 0), zero point mid;
- asymmetric: lo = min(lo, 0), hi = max(hi, 0); scale = (hi - lo) / qmax;
  zf = 0 - lo / scale (lo when scale == 0); zp = 0 if zf < 0, qmax if zf > qmax, else
  roundf(zf);
- rs = 1 / scale (0 when scale == 0), code = clamp(roundf(v * rs + zp), 0, qmax), where
  roundf rounds half away from zero (C's ``roundf``, not numpy's half-to-even), the
  product and the sum each rounded to float32 (no fused multiply-add), and a NaN code
  (0 * inf, when 1/scale overflows for a denormal scale) becomes 0, as x86's float to
  integer conversion makes it.

Packing, as ORT's MatMulNBits reads its initializers (``n_blocks = ceil(K / block)``):
``q`` uint8 ``[rows, n_blocks, block * b / 8]``, 4-bit codes two per byte, low nibble
first; the bytes of the last block past K are 0 (ORT leaves them as its caller's
``np.zeros`` buffer), except that with an odd K the high nibble of the byte holding the
last value repeats the code of the value before it, when both lie in the same pair of
blocks (ORT packs pairs of blocks per task and does not clear its last code there);
``scales`` float32 ``[rows, n_blocks]``; ``zero_points`` (asymmetric only) uint8
``[rows, ceil(n_blocks / 2)]`` two per byte, low nibble first, an odd last block's high
nibble 8 (4-bit), or ``[rows, n_blocks]`` (8-bit). ``rows`` is every axis but the last,
flattened. ORT's ``quantize_matmul_*`` write nothing to the zero point buffer when
symmetric, and its quantizer then gives the node no zero point input: MatMulNBits takes
mid as the zero point.

Dequantized value: ``(code - zp) * scale`` in float32, zp = mid when symmetric, as ORT
computes it.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from . import _cache  # noqa: F401  (the kernel cache, before any @njit here)
from ._bits import f32_from_bits
from ._input import as_rows, f32_slices, faulted_empty

BITS = (4, 8)
BLOCKS = (16, 32, 64, 128, 256)
F0, F1, HALF = np.float32(0.0), np.float32(1.0), np.float32(0.5)
U32 = np.uint32
ALL = np.uint32(0xFFFFFFFF)
SIGN = np.uint32(0x80000000)
NEG_INF_KEY = np.uint32(0x007FFFFF)  # order key of -inf
POS_INF_KEY = np.uint32(0xFF800000)  # order key of +inf


@njit(nogil=True, cache=True, inline="always")
def _code(v, rs, zp, qmax):
    """clamp(roundf(v * rs + zp), 0, qmax), NaN -> 0. Clamped first (the same result:
    roundf keeps 0 and qmax, and maps below 0 to at most 0), so the conversion is safe;
    written as selects, which vectorise, where branches on random data mispredict."""
    t = v * rs + zp
    t = t if t >= F0 else F0   # NaN too
    t = t if t < qmax else qmax
    i = np.int32(t)            # t in [0, qmax]: truncation is floor
    return i + np.int32(1) if t - np.float32(i) >= HALF else i


@njit(nogil=True, cache=True, inline="always")
def _range(ib):
    """(min, max) of a block as order keys of its float bits (u ^ SIGN for u >= 0, ~u
    below: unsigned order = float order, -0 just below +0). Integer reductions, which
    LLVM vectorises where float min/max without fastmath stay scalar; NaN and Inf land
    beyond the finite keys (below NEG_INF_KEY + 1 or from POS_INF_KEY up)."""
    kmin = ALL
    kmax = U32(0)
    for j in range(len(ib)):
        u = ib[j]
        key = U32(u ^ (ALL if u >= SIGN else SIGN))
        kmin = min(kmin, key)
        kmax = max(kmax, key)
    return kmin, kmax


@njit(nogil=True, cache=True, inline="always")
def _from_key(key):
    return f32_from_bits(U32(key ^ SIGN) if key >= SIGN else U32(~key))


@njit(nogil=True, cache=True, inline="always")
def _block_params(xb, ib, sym, qmax, mid, bad):
    """(scale, zero point) of one block, as ORT's range2scale / range2scalezp."""
    kmin, kmax = _range(ib)
    if kmin <= NEG_INF_KEY or kmax >= POS_INF_KEY:
        bad[0] = 1
    lo = _from_key(kmin)
    hi = _from_key(kmax)
    if sym:
        m = hi if abs(hi) > abs(lo) else lo
        if m == F0:
            # all zeros: ORT's in-order scan keeps the first value, so the scale is
            # -0.0 or +0.0 as the first zero is +0.0 or -0.0
            m = xb[0]
        return -m / mid, int(mid)
    # asymmetric: the sign of a zero lo or hi changes nothing below
    lo = min(lo, F0)
    hi = max(hi, F0)
    scale = (hi - lo) / qmax
    zf = lo
    if scale != F0:
        zf = F0 - lo / scale
    if zf < F0:
        return scale, 0
    if zf > qmax:
        return scale, int(qmax)
    i = int(zf)  # roundf: half away from zero
    return scale, i + 1 if zf - np.float32(i) >= HALF else i


@njit(nogil=True, cache=True, parallel=True)
def _quantize(x, xi, bits, block, sym, q, scales, zps, bad):
    """x: (rows, K) float32 (xi: its bits as uint32) -> q (rows, n_blocks * blob) uint8,
    scales (rows, n_blocks) float32, zps (rows, zp bytes) uint8 (untouched if ``sym``)."""
    n_rows, k = x.shape
    n_blocks = scales.shape[1]
    blob = block * bits // 8
    qmax = np.float32((1 << bits) - 1)
    mid = np.float32(1 << (bits - 1))
    for r in prange(n_rows):
        for b in range(n_blocks):
            start = b * block
            end = min(start + block, k)
            n = end - start
            xb = x[r, start:end]
            ob = q[r, b * blob:(b + 1) * blob]
            scale, zp = _block_params(xb, xi[r, start:end], sym, qmax, mid, bad)
            scales[r, b] = scale
            if not sym:
                if bits == 8:
                    zps[r, b] = zp
                elif b & 1:
                    zps[r, b >> 1] = (np.int64(zps[r, b >> 1]) & 0x0F) | (zp << 4)
                else:
                    zps[r, b >> 1] = zp | 0x80  # an odd last block leaves 8 above
            rs = F1 / scale if scale != F0 else F0
            zpf = np.float32(zp)
            if bits == 8:
                for j in range(n):
                    ob[j] = _code(xb[j], rs, zpf, qmax)
                t = n
            else:
                for t in range(n // 2):
                    ob[t] = _code(xb[2 * t], rs, zpf, qmax) | (_code(xb[2 * t + 1], rs, zpf, qmax) << 4)
                t = n // 2
                if n & 1:
                    # ORT packs two blocks per task and does not clear its last high
                    # code between pairs: an odd K's final byte repeats the code of the
                    # value before, unless the final value opens such a pair
                    hi4 = 0
                    if (end - 1) % (2 * block) != 0:
                        hi4 = (np.int64(ob[t - 1]) if n > 1 else np.int64(q[r, b * blob - 1])) >> 4
                    ob[t] = _code(xb[n - 1], rs, zpf, qmax) | (hi4 << 4)
                    t += 1
            for u in range(t, blob):
                ob[u] = 0


@njit(nogil=True, cache=True, parallel=True)
def _dequantize(q, scales, zps, bits, block, sym, k, out):
    """(code - zp) * scale per value, float32, into out (rows, K)."""
    blob = block * bits // 8
    mid = 1 << (bits - 1)
    for r in prange(out.shape[0]):
        for b in range(scales.shape[1]):
            s = scales[r, b]
            if sym:
                zp = mid
            elif bits == 8:
                zp = np.int64(zps[r, b])
            else:
                zp = (np.int64(zps[r, b >> 1]) >> (4 * (b & 1))) & 15
            start = b * block
            end = min(start + block, k)
            o = b * blob
            for j in range(start, end):
                t = j - start
                if bits == 8:
                    c = np.int64(q[r, o + t])
                else:
                    c = (np.int64(q[r, o + (t >> 1)]) >> (4 * (t & 1))) & 15
                out[r, j] = np.float32(c - zp) * s


def shapes(bits: int, block: int, sym: bool,
           shape: tuple[int, ...]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The payload's arrays for a tensor of ``shape``: name -> (dtype, shape)."""
    rows = math.prod(shape[:-1])
    n_blocks = -(-shape[-1] // block)
    out = {"q": ("u8", (rows, n_blocks, block * bits // 8)), "scales": ("f32", (rows, n_blocks))}
    if not sym:
        out["zero_points"] = ("u8", (rows, -(-n_blocks // 2) if bits == 4 else n_blocks))
    return out


def quantize(bits: int, block: int, sym: bool, array: np.ndarray) -> dict[str, np.ndarray]:
    if bits not in BITS or block not in BLOCKS:
        raise ValueError(f"MatMulNBits supports bits {BITS} and blocks {BLOCKS}, not {bits}/{block}")
    rows = as_rows(array, 1)
    n_rows, k = rows.shape
    layout = shapes(bits, block, sym, (n_rows, k))
    q = faulted_empty(layout["q"][1], np.uint8)
    scales = np.empty(layout["scales"][1], np.float32)
    zps = np.empty(layout["zero_points"][1] if not sym else (n_rows, 0), np.uint8)
    bad = np.zeros(1, np.uint8)
    q2 = q.reshape(n_rows, -1)
    for start, part in f32_slices(rows):
        n = len(part)
        _quantize(part, part.view(np.uint32), bits, block, sym, q2[start:start + n],
                  scales[start:start + n], zps[start:start + n], bad)
    if bad[0]:
        raise ValueError("NaN or Inf in input")
    out = {"q": q, "scales": scales}
    if not sym:
        out["zero_points"] = zps
    return out


def dequantize(bits: int, block: int, sym: bool, data: dict[str, np.ndarray],
               shape: tuple[int, ...]) -> np.ndarray:
    want = shapes(bits, block, sym, tuple(shape))
    for name, (_, s) in want.items():
        if name not in data or tuple(np.shape(data[name])) != s:
            raise ValueError(f"packed data does not fit shape {list(shape)} "
                             f"(int{bits}, block {block}{'' if sym else ', asym'})")
    n_rows, n_blocks, blob = want["q"][1]
    k = shape[-1]
    q = np.ascontiguousarray(data["q"], np.uint8).reshape(n_rows, n_blocks * blob)
    scales = np.ascontiguousarray(data["scales"], np.float32)
    zps = (np.zeros((n_rows, 0), np.uint8) if sym
           else np.ascontiguousarray(data["zero_points"], np.uint8))
    out = np.empty((n_rows, k), np.float32)
    _dequantize(q, scales, zps, bits, block, sym, k, out)
    return out.reshape(shape)
