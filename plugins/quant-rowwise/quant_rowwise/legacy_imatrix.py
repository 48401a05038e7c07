"""GGUF q4_0 q4_1 q5_0 q5_1 with an importance matrix, as llama.cpp's
``quantize_row_q{4,5}_{0,1}_impl`` code them when given ``quant_weights``.

Each value of a row is weighted by its column's importance times sqrt(sigma2 + x**2),
sigma2 the mean of x**2 over the whole row; each 32-value block is then searched with
those weights: ``make_qx_quants`` for q4_0/q5_0 (a scale, codes around the middle),
``make_qkx3_quants`` for q4_1/q5_1 (a scale and a min). llama.cpp keeps the codes the
search found for its float scale; with ``refine`` each block is then improved in the
same weighted error: codes nearest under the stored f16 scale (and min), and a
least-squares refit of the scale (and min) for those codes, each kept only when it lowers
the block's error. q8_0 has no importance-aware search; its scheme ignores the weights.

Input is read as raw bits (f32, f16, bf16) and widened a row at a time inside the kernel,
never copied to f32 whole. Scales are rounded to f16 saturating at 65504 (as the k-quants
do), where ggml's conversion would give inf.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from . import _cache  # noqa: F401  (the kernel cache, before any @njit here)
from .kquant_bits import F0, F1, FM, f16_to_f32, f32_to_f16, load_values, put_f16
from .kquant_wsearch import make_qkx3, make_qx_w, spread, spread_weights

QK = 32
# type -> (nmax, affine, block bytes): q4_0/q5_0 codes 0..2*nmax-1 meaning q - nmax,
# q4_1/q5_1 codes 0..nmax
TYPES = {"q4_0": (8, False, 18), "q5_0": (16, False, 22), "q4_1": (15, True, 20),
         "q5_1": (31, True, 24)}
# Rounds of least-squares refit per block in the refinement.
_ITERS = 2


@njit(nogil=True, cache=True, fastmath=FM)
def _sse(x, w, d, m, lo, L):
    """Weighted squared error of x[0:32] as d*q + m with the codes L (q = L + lo)."""
    s = np.float64(0.0)
    for i in range(QK):
        e = d * np.float32(L[i] + lo) + m - x[i]
        s += np.float64(w[i] * e * e)
    return s


@njit(nogil=True, cache=True, fastmath=FM)
def _nearest(x, d, m, lo, hi, L):
    """L[i] = the code nearest x[i] as d*q + m, q in lo..hi (stored as q - lo)."""
    idv = F1 / d
    flo = np.float32(lo)
    fhi = np.float32(hi)
    for i in range(QK):
        L[i] = int(min(max(np.rint((x[i] - m) * idv), flo), fhi)) - lo


@njit(nogil=True, cache=True, fastmath=FM)
def _refine(x, w, affine, lo, hi, st, L, La):
    """Lower the weighted error of the block x[0:32] (value d*q + m, q in lo..hi, m = 0
    unless affine): st[0], st[1] the f16 bits of d and m (in/out), L the codes (in/out),
    La int32[32] scratch. Keeps a change only when the error drops."""
    d = f16_to_f32(st[0])
    m = f16_to_f32(st[1]) if affine else F0
    if d == F0:
        return
    best = _sse(x, w, d, m, lo, L)
    _nearest(x, d, m, lo, hi, La)
    e = _sse(x, w, d, m, lo, La)
    if e < best:
        best = e
        for i in range(QK):
            L[i] = La[i]
    for _ in range(_ITERS):
        # least squares for d (and m) with the codes fixed
        sw = 0.0
        sq = 0.0
        sqq = 0.0
        sx = 0.0
        sxq = 0.0
        for i in range(QK):
            wi = np.float64(w[i])
            q = np.float64(L[i] + lo)
            v = np.float64(x[i])
            sw += wi
            sq += wi * q
            sqq += wi * q * q
            sx += wi * v
            sxq += wi * v * q
        if affine:
            det = sqq * sw - sq * sq
            if not det > 1e-30 * sqq * sw:
                return
            nd = (sxq * sw - sx * sq) / det
            nm = (sqq * sx - sq * sxq) / det
        else:
            if not sqq > 0.0:
                return
            nd = sxq / sqq
            nm = 0.0
        h0 = f32_to_f16(np.float32(nd))
        h1 = f32_to_f16(np.float32(nm)) if affine else st[1]
        if h0 == st[0] and h1 == st[1]:
            return
        d2 = f16_to_f32(h0)
        m2 = f16_to_f32(h1) if affine else F0
        if d2 == F0:
            return
        _nearest(x, d2, m2, lo, hi, La)
        e = _sse(x, w, d2, m2, lo, La)
        if not e < best:
            return
        best = e
        st[0] = h0
        st[1] = h1
        for i in range(QK):
            L[i] = La[i]


@njit(nogil=True, cache=True)
def _pack(L, nmax, affine, st, out, o):
    """One block's bytes at out[o:]: d (and m), the q5 types' fifth bits, the nibbles."""
    put_f16(out, o, st[0])
    p = o + 2
    if affine:
        put_f16(out, p, st[1])
        p += 2
    if nmax >= 16:
        qh = 0
        for j in range(16):
            qh |= ((L[j] >> 4) & 1) << j
            qh |= ((L[j + 16] >> 4) & 1) << (j + 16)
        for k in range(4):
            out[p + k] = (qh >> (8 * k)) & 0xFF
        p += 4
    for j in range(16):
        out[p + j] = (L[j] & 0xF) | ((L[j + 16] & 0xF) << 4)


@njit(nogil=True, cache=True, fastmath=FM)
def rows_legacy_w(x, mode, lut, qw, nmax, affine, refine, out, start, end):
    """Rows start..end-1 of the uint16 bit rows ``x`` (widened by mode and lut, as
    kquant_bits.load_block does) into q4_0/q5_0 (nmax 8/16) or q4_1/q5_1 (affine,
    nmax 15/31) blocks in ``out``, weighted by qw (float32, one per column). Returns how
    many rows held NaN/Inf.

    Scratch, from one 64-byte-aligned buffer (so the vectorized sums round alike on every
    thread; see kquant_bits.arena): the row's f32 bits (xr: as float32), then per block
    w float32[32] the weights, L and La int32[32] codes, st int32[2] f16 bits of d and m.
    """
    n = x.shape[1] // 2 if mode == 0 else x.shape[1]
    nb = n // QK
    ts = out.shape[1] // nb
    raw = np.zeros(4 * n + 512 + 64, np.uint8)
    off = (64 - raw.ctypes.data % 64) % 64
    buf = raw[off:off + 4 * n + 512]
    ubuf = buf[0:4 * n].view(np.uint32)
    xr = ubuf.view(np.float32)
    w = buf[4 * n:4 * n + 128].view(np.float32)
    L = buf[4 * n + 128:4 * n + 256].view(np.int32)
    La = buf[4 * n + 256:4 * n + 384].view(np.int32)
    Laux = buf[4 * n + 384:4 * n + 512].view(np.int32)
    st = np.zeros(2, np.int32)
    lo = -nmax if not affine else 0
    hi = nmax - 1 if not affine else nmax
    bad = 0
    for r in range(start, end):
        if not load_values(x, r, 0, n, mode, lut, ubuf):
            bad += 1
            continue
        sigma2 = spread(xr, 0, n, 1.0)
        for ib in range(nb):
            o = QK * ib
            xb = xr[o:o + QK]
            spread_weights(xr, o, QK, qw, o, sigma2, w)
            if affine:
                s, mneg = make_qkx3(QK, nmax, xb, 0, w, L, Laux)
                st[0] = f32_to_f16(s)
                st[1] = f32_to_f16(-mneg)
            else:
                st[0] = f32_to_f16(make_qx_w(QK, nmax, xb, 0, w, 0, L, 0))
                st[1] = 0
            if refine:
                _refine(xb, w, affine, lo, hi, st, L, La)
            _pack(L, nmax, affine, st, out[r], ts * ib)
    return bad


def quantize(kind: str, array: np.ndarray, weights: np.ndarray, refine: bool = True) -> np.ndarray:
    """``kind`` blocks (uint8, shape ``(*array.shape[:-1], row_length // 32 * type_size)``)
    of the f32/f16/bf16 ``array``, weighted by ``weights`` (float32 of shape
    ``(row_length,)``, read-only and C-contiguous, as kquant_importance gives it).

    :raises ValueError: on NaN or Inf in ``array`` (and, from kquants' bit view, on a row
        length that is not a multiple of 32 or another dtype).
    """
    from ._compile import ensure
    from ._input import faulted_empty
    from ._threads import run_split
    from .kquants import _bits_2d

    bits, mode, lut = _bits_2d(array, kind, QK)
    nmax, affine, size = TYPES[kind]
    shape = np.shape(array)
    out = faulted_empty((bits.shape[0], shape[-1] // QK * size), np.uint8)
    if bits.shape[0]:
        ensure([kind], (True,))
        bad = run_split(rows_legacy_w, (bits, mode, lut, weights, nmax, affine, refine, out),
                        bits.shape[0])
        if bad:
            raise ValueError("NaN or Inf in input")
    return out.reshape(*shape[:-1], out.shape[1])
