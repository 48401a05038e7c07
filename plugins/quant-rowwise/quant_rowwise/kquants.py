"""GGUF k-quants (q2_k q3_k q4_k q5_k q6_k) as Numba kernels, in ggml's block layouts.

Each 256-weight super-block is first quantized with the algorithm llama.cpp's reference
quantizer uses when it has no importance matrix (``quantize_row_qN_K_ref``: the
weighted min/scale searches of ``make_qkx2_quants``, ``make_qx_quants`` and
``make_q3_quants``, then 6-/4-bit sub-block scales under an f16 super-scale), in float32.
Without the refinement (``refine=False``) the bytes equal ggml's for most blocks (q3_k
99.9%, q6_k 98.5%, q4_k 96%, q5_k 77% on gaussian rows: float sums are reassociated or
fused so they vectorize). Two departures lower the error further:

- a refinement pass per super-block: for q4_k/q5_k/q2_k a least-squares refit of the two
  f16 super-scales and +-1 steps of each 6-/4-bit sub-scale and sub-min; for q3_k/q6_k
  the integer sub-scale nearest each sub-block's least-squares optimum. A change is kept
  only when it lowers that (sub-)block's squared error.
- q2_k's scale search ranks candidates by weighted squared error instead of llama.cpp's
  weighted absolute error (the target here is RMSE; it is also faster).

Input is read as raw bits (f32 as uint32, f16 and bf16 as uint16) and widened one
block at a time inside the kernel, so large tensors are never copied to f32.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

import convcore

from ._input import faulted_empty

QK_K = 256
TYPE_SIZE = {"q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210}
BITS = {name: size * 8 / QK_K for name, size in TYPE_SIZE.items()}

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_GROUP_MAX_EPS = np.float32(1e-15)
# Reassociation lets LLVM vectorize the float32 sums of the searches; no nnan/ninf, so the
# NaN guards below keep working.
_ITERS = (1, 1, 1)  # refinement rounds for q4_k q5_k q2_k: 2 buys ~0.4% RMSE for ~20% time
_FM = {"reassoc", "contract", "arcp", "nsz"}


class KQuantError(convcore.ConvcoreError, ValueError):
    """Bad input to a k-quant: a row that is not a multiple of 256, NaN/Inf, a dtype."""


# --------------------------------------------------------------------------- f16 bits


@njit(nogil=True, cache=True, inline="always")
def _f16_to_f32(h):
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
def _f32_to_f16(f):
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


@njit(nogil=True, cache=True, fastmath=_FM, inline="always")
def _rint_clamp(v, lo, hi):
    """ggml's nearest_int (round half to even) clamped to [lo, hi]; NaN -> lo."""
    r = np.rint(v)
    r = r if r >= lo else lo  # NaN compares false: -> lo
    return int(r if r <= hi else hi)


@njit(nogil=True, cache=True, inline="always")
def _nearest(v):
    r = np.rint(v)
    if r > 4194303.0:
        return 4194303
    if r < -4194303.0:
        return -4194303
    if r != r:
        return 0
    return int(r)


@njit(nogil=True, cache=True, fastmath=_FM)
def _load(x, r, c0, mode, lut, ubuf):
    """Widen one 256-weight block of row ``r`` into ``ubuf`` as f32 bits; False if non-finite."""
    bad = np.uint32(0)
    if mode == 0:
        for i in range(QK_K):
            b = np.uint32(x[r, c0 + i])
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


# ------------------------------------------------------------ llama.cpp's searches


@njit(nogil=True, cache=True, fastmath=_FM)
def _make_qkx2(n, nmax, x, xo, w, L, Laux, rmin, rdelta, nstep, use_mad):
    """Affine (scale, -min) for x[xo:xo+n] with codes 0..nmax, as make_qkx2_quants."""
    fmax = np.float32(nmax)
    mn = x[xo]
    mx = x[xo]
    sum_w = _F0
    sum_x = _F0
    sum_x2 = _F0
    for i in range(n):
        v = x[xo + i]
        mn = min(mn, v)
        mx = max(mx, v)
        sum_w += w[i]
        sum_x += w[i] * v
        sum_x2 += w[i] * v * v
    if mn > _F0:
        mn = _F0
    if mx == mn:
        for i in range(n):
            L[xo + i] = 0
        return _F0, -mn
    iscale = fmax / (mx - mn)
    scale = _F1 / iscale
    best = _F0
    for i in range(n):
        l = _rint_clamp(iscale * (x[xo + i] - mn), 0, nmax)
        L[xo + i] = l
        diff = scale * np.float32(l) + mn - x[xo + i]
        diff = abs(diff) if use_mad else diff * diff
        best += w[i] * diff
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * np.float32(step) + fmax) / (mx - mn)
        sum_l = _F0
        sum_l2 = _F0
        sum_xl = _F0
        for i in range(n):
            l = _rint_clamp(iscale * (x[xo + i] - mn), 0, nmax)
            Laux[i] = l
            fl = np.float32(l)
            wl = w[i] * fl
            sum_l += wl
            sum_l2 += wl * fl
            sum_xl += wl * x[xo + i]
        dd = sum_w * sum_l2 - sum_l * sum_l
        if dd > _F0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / dd
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / dd
            if this_min > _F0:
                this_min = _F0
                this_scale = sum_xl / sum_l2
            if use_mad:
                cur = _F0
                for i in range(n):
                    cur += w[i] * abs(this_scale * np.float32(Laux[i]) + this_min - x[xo + i])
            else:
                # sum w*(s*l + m - x)**2 expanded, so no second pass over the weights
                ts = np.float64(this_scale)
                tm = np.float64(this_min)
                cur = np.float32(ts * ts * sum_l2 + 2.0 * ts * tm * sum_l + tm * tm * sum_w
                                 - 2.0 * ts * sum_xl - 2.0 * tm * sum_x + sum_x2)
            if cur < best:
                for i in range(n):
                    L[xo + i] = Laux[i]
                best = cur
                scale = this_scale
                mn = this_min
    return scale, -mn


# For q2_K, make_qkx2_quants runs the 16 sub-blocks of a super-block as vector lanes: the
# super-block is transposed (value i of sub-block j at i*nsub + j) and each step of the
# search is done for all lanes at once, each lane's sums running over its values in order.
# The scratch is one flat float32 array with regions at fixed offsets, which LLVM can tell
# apart (rows of a 2-D array it could not), and the numpy error model drops the
# division-by-zero checks that kept such loops scalar. Per 4M values on one thread (q2_K's
# settings): 78-98 ms, against 158-181 ms for _make_qkx2. For q4_K/q5_K's 8 sub-blocks of
# 32 values the lanes were slower (half-empty vectors), so they keep _make_qkx2.
_K_XT, _K_WT, _K_LT, _K_LA = 0, 256, 512, 768   # values, weights, best codes, codes tried
(_K_MN, _K_MX, _K_SW, _K_SX, _K_SX2, _K_SCALE, _K_BEST, _K_IS, _K_SL, _K_SL2, _K_SXL, _K_LIVE,
 _K_ACC) = (1024 + 16 * k for k in range(13))   # one per lane


@njit(nogil=True, cache=True, error_model="numpy", fastmath=_FM)
def _make_qkx2_lanes(x, nsub, sub, nmax, rmin, rdelta, nstep, A, L, fs, fm):
    """make_qkx2_quants (squared error) for the nsub sub-blocks of ``sub`` values in
    x[0:nsub*sub], whose weights the caller has put at A[_K_WT + i*nsub + j]: per
    sub-block j the scale into fs[j], the min (negated, as llama.cpp returns it) into fm[j]
    and codes 0..nmax into L.

    Per sub-block: codes at scale (max - min)/nmax, then nstep + 1 more scales, each code
    set fitted by weighted least squares (min clamped to <= 0) and kept when its weighted
    squared error is lower; a kept fit's min is the one the next scales start from, as in
    llama.cpp.
    """
    fmax = np.float32(nmax)
    for j in range(nsub):
        for i in range(sub):
            A[_K_XT + i * nsub + j] = x[j * sub + i]
    for j in range(nsub):
        A[_K_MN + j] = x[j * sub]
        A[_K_MX + j] = x[j * sub]
        A[_K_SW + j] = _F0
        A[_K_SX + j] = _F0
        A[_K_SX2 + j] = _F0
    for i in range(sub):
        o = i * nsub
        for j in range(nsub):
            v = A[_K_XT + o + j]
            w = A[_K_WT + o + j]
            A[_K_MN + j] = min(A[_K_MN + j], v)
            A[_K_MX + j] = max(A[_K_MX + j], v)
            A[_K_SW + j] += w
            A[_K_SX + j] += w * v
            A[_K_SX2 + j] += w * v * v
    for j in range(nsub):
        mn = min(A[_K_MN + j], _F0)
        A[_K_MN + j] = mn
        live = A[_K_MX + j] != mn  # not: a constant sub-block, codes 0 and scale 0
        isc = fmax / (A[_K_MX + j] - mn)
        A[_K_LIVE + j] = _F1 if live else _F0
        A[_K_IS + j] = isc if live else _F0
        A[_K_SCALE + j] = _F1 / isc if live else _F0
        A[_K_BEST + j] = _F0
    for i in range(sub):
        o = i * nsub
        for j in range(nsub):
            v = A[_K_XT + o + j]
            q = min(max(np.rint(A[_K_IS + j] * (v - A[_K_MN + j])), _F0), fmax)
            A[_K_LT + o + j] = q
            d = A[_K_SCALE + j] * q + A[_K_MN + j] - v
            A[_K_BEST + j] += A[_K_WT + o + j] * (d * d)
    for step in range(nstep + 1):
        for j in range(nsub):
            A[_K_IS + j] = (rmin + rdelta * np.float32(step) + fmax) / (A[_K_MX + j] - A[_K_MN + j])
            A[_K_SL + j] = _F0
            A[_K_SL2 + j] = _F0
            A[_K_SXL + j] = _F0
        for i in range(sub):
            o = i * nsub
            for j in range(nsub):
                v = A[_K_XT + o + j]
                q = min(max(np.rint(A[_K_IS + j] * (v - A[_K_MN + j])), _F0), fmax)
                A[_K_LA + o + j] = q
                wq = A[_K_WT + o + j] * q
                A[_K_SL + j] += wq
                A[_K_SL2 + j] += wq * q
                A[_K_SXL + j] += wq * v
        for j in range(nsub):
            sw = A[_K_SW + j]
            sl = A[_K_SL + j]
            sl2 = A[_K_SL2 + j]
            sxl = A[_K_SXL + j]
            sx = A[_K_SX + j]
            dd = sw * sl2 - sl * sl
            ts = (sw * sxl - sx * sl) / dd
            tm = (sl2 * sx - sl * sxl) / dd
            pos = tm > _F0
            tm = _F0 if pos else tm
            ts = sxl / sl2 if pos else ts
            # sum w (s q + m - x)**2 expanded, so no second pass over the values
            t64 = np.float64(ts)
            m64 = np.float64(tm)
            cur = np.float32(t64 * t64 * sl2 + 2.0 * t64 * m64 * sl + m64 * m64 * sw
                             - 2.0 * t64 * sxl - 2.0 * m64 * sx + A[_K_SX2 + j])
            keep = (A[_K_LIVE + j] != _F0) & (dd > _F0) & (cur < A[_K_BEST + j])
            A[_K_ACC + j] = _F1 if keep else _F0
            A[_K_BEST + j] = cur if keep else A[_K_BEST + j]
            A[_K_SCALE + j] = ts if keep else A[_K_SCALE + j]
            A[_K_MN + j] = tm if keep else A[_K_MN + j]
        for i in range(sub):
            o = i * nsub
            for j in range(nsub):
                A[_K_LT + o + j] = A[_K_LA + o + j] if A[_K_ACC + j] != _F0 else A[_K_LT + o + j]
    for j in range(nsub):
        live = A[_K_LIVE + j] != _F0
        fs[j] = A[_K_SCALE + j] if live else _F0
        fm[j] = -A[_K_MN + j]
        for i in range(sub):
            L[j * sub + i] = int(A[_K_LT + i * nsub + j]) if live else 0


# q6_K's and q3_K's scale searches run the 16 sub-blocks of a super-block as vector lanes.
# llama.cpp searches one 16-value sub-block at a time, and LLVM does not vectorise those
# short loops; here the super-block is transposed (value i of sub-block j at 16*i + j) and
# each step of the search is done for all 16 sub-blocks at once, each lane's sums still
# running over its values in order.


@njit(nogil=True, cache=True, fastmath=_FM)
def _make_qx16(x, L, fs, S):
    """make_qx_quants(16, nmax=32, rmse_type 1), q6_K's scale search, for all 16 sub-blocks
    of the super-block x[0:256] at once: scales into fs[0:16], codes + 32 into L.

    llama.cpp searches one sub-block at a time: an initial scale -32/max, then 18 more
    around it, each scoring its 16 codes by the x**2-weighted least squares fit. Here the
    16 sub-blocks are the vector lanes (x transposed into S[0], so lane j reads sub-block j)
    and every candidate is scored for all of them in one pass; each lane's sums still run
    over its values in order. About 1.7x faster than the per-sub-block loop, whose 16-value
    reductions LLVM did not vectorise. S: float32 scratch (9, 256).
    """
    nmax = 32
    fnmax = np.float32(nmax)
    flo = -fnmax
    fhi = fnmax - _F1
    xt = S[0]
    w2 = S[1]
    w3 = S[2]
    mx = S[3]    # the value of largest magnitude per sub-block (0: an all-small one)
    cis = S[4]   # the candidate inverse scale per sub-block
    bis = S[5]   # the best so far
    best = S[6]
    slx = S[7]
    sl2 = S[8]
    for j in range(16):
        m = _F0
        a = _F0
        for i in range(16):
            v = x[16 * j + i]
            if abs(v) > a:
                a = abs(v)
                m = v
        mx[j] = m if a >= _GROUP_MAX_EPS else _F0
        for i in range(16):
            v = x[16 * j + i]
            xt[16 * i + j] = v
            w2[16 * i + j] = v * v
            w3[16 * i + j] = v * v * v
    for k in range(19):  # k = 0: the initial scale; then steps -9..-1, 1..9
        step = k - 10 if k <= 9 else k - 9
        num = -(fnmax + np.float32(0.1) * np.float32(step)) if k else -fnmax
        for j in range(16):
            cis[j] = num / mx[j] if mx[j] != _F0 else _F0
            slx[j] = _F0
            sl2[j] = _F0
        for i in range(16):
            o = 16 * i
            for j in range(16):
                fl = min(max(np.rint(cis[j] * xt[o + j]), flo), fhi)
                slx[j] += w3[o + j] * fl
                sl2[j] += w2[o + j] * fl * fl
        for j in range(16):
            if k == 0 or (sl2[j] > _F0 and slx[j] * slx[j] > best[j] * sl2[j]):
                sc = slx[j] / sl2[j] if sl2[j] != _F0 else _F0
                fs[j] = sc
                best[j] = sc * slx[j]
                bis[j] = cis[j]
    for j in range(16):
        if mx[j] == _F0:
            fs[j] = _F0
            for i in range(16):
                L[16 * j + i] = 0
        else:
            for i in range(16):
                L[16 * j + i] = nmax + int(min(max(np.rint(bis[j] * x[16 * j + i]), flo), fhi))


# _make_q3x16's scratch: one flat float32 array with its regions at fixed offsets. Rows of
# a 2-D array (as _make_qx16 uses) hid from LLVM that the regions do not overlap, and with
# Numba's default (Python) error model the division-by-zero checks kept the sweep scalar;
# with both changed the search took 20-25 ms instead of 29-32 ms per 4M values (one thread).
_XT, _W2, _W3, _LT = 0, 256, 512, 768      # 256 values each, transposed
_MX, _CIS, _SX, _S2 = 1024, 1040, 1056, 1072  # one per lane
LANE_SCRATCH = 1024 + 16 * 13  # room for the larger layout, _make_qkx2_lanes'


@njit(nogil=True, cache=True, error_model="numpy", fastmath=_FM)
def _make_q3x16(x, L, fs, A):
    """make_q3_quants(16, nmax=4, do_rmse=true), q3_K's search, for the 16 sub-blocks of
    x[0:256]: scales into fs[0:16], codes + 4 into L.

    llama.cpp rounds every value at -4/max, then sweeps the values in order up to 5 times,
    moving a code to the one its least-squares scale suggests when that lowers the
    x**2-weighted error, and stops after a sweep that changed nothing. The lanes sweep
    together until no lane changes: a sweep that changes nothing in a lane leaves it as it
    was, so the further sweeps it takes part in change nothing there either.
    """
    nmax = 4
    fnmax = np.float32(nmax)
    flo = -fnmax
    fhi = fnmax - _F1
    for j in range(16):
        for i in range(16):
            v = x[16 * j + i]
            A[_XT + 16 * i + j] = v
            A[_W2 + 16 * i + j] = v * v
            A[_W3 + 16 * i + j] = v * v * v
    for j in range(16):
        A[_MX + j] = _F0  # the value of largest magnitude (first if tied); |it| in _CIS
        A[_CIS + j] = _F0
    for i in range(16):
        for j in range(16):
            v = A[_XT + 16 * i + j]
            gt = abs(v) > A[_CIS + j]
            A[_CIS + j] = abs(v) if gt else A[_CIS + j]
            A[_MX + j] = v if gt else A[_MX + j]
    for j in range(16):
        A[_MX + j] = A[_MX + j] if A[_CIS + j] >= _GROUP_MAX_EPS else _F0
    for j in range(16):
        A[_CIS + j] = -fnmax / A[_MX + j] if A[_MX + j] != _F0 else _F0
        A[_SX + j] = _F0
        A[_S2 + j] = _F0
    for i in range(16):
        o = 16 * i
        for j in range(16):
            fl = min(max(np.rint(A[_CIS + j] * A[_XT + o + j]), flo), fhi)
            A[_LT + o + j] = fl
            A[_SX + j] += A[_W3 + o + j] * fl
            A[_S2 + j] += A[_W2 + o + j] * fl * fl
    for _ in range(5):
        changed = _F0
        for i in range(16):
            o = 16 * i
            for j in range(16):
                fl = A[_LT + o + j]
                sx = A[_SX + j]
                s2 = A[_S2 + j]
                w3 = A[_W3 + o + j]
                w2 = A[_W2 + o + j]
                slx = sx - w3 * fl
                sl2 = s2 - w2 * fl * fl
                nl = min(max(np.rint(A[_XT + o + j] * sl2 / slx), flo), fhi)
                nslx = slx + w3 * nl
                nsl2 = sl2 + w2 * nl * nl
                ok = (slx > _F0) & (nl != fl) & (nsl2 > _F0) & (nslx * nslx * s2 > sx * sx * nsl2)
                A[_LT + o + j] = nl if ok else fl
                A[_SX + j] = nslx if ok else sx
                A[_S2 + j] = nsl2 if ok else s2
                changed += _F1 if ok else _F0
        if changed == _F0:
            break
    for j in range(16):
        if A[_MX + j] == _F0:
            fs[j] = _F0
            for i in range(16):
                L[16 * j + i] = 0
        else:
            s2 = A[_S2 + j]
            fs[j] = A[_SX + j] / s2 if s2 > _F0 else _F0
            for i in range(16):
                L[16 * j + i] = int(A[_LT + 16 * i + j]) + nmax


# ------------------------------------------------ error of one sub-block, refinements


@njit(nogil=True, cache=True, fastmath=_FM, inline="always")
def _affine_sse(x, wt, o, n, dl, ml, nmax):
    """Weighted squared error of x[o:o+n] coded as dl*q - ml with the nearest q in 0..nmax."""
    s = _F0
    if dl == _F0:
        for i in range(n):
            e = -ml - x[o + i]
            s += wt[o + i] * e * e
        return np.float64(s)
    idl = _F1 / dl
    fmax = np.float32(nmax)
    for i in range(n):
        v = x[o + i]
        q = min(max(np.rint((v + ml) * idl), _F0), fmax)
        e = dl * q - ml - v
        s += wt[o + i] * e * e
    return np.float64(s)


@njit(nogil=True, cache=True, fastmath=_FM, inline="always")
def _sym_sse(x, wt, o, n, dl, qlo, qhi):
    """Weighted squared error of x[o:o+n] coded as dl*q with the nearest q in qlo..qhi."""
    s = _F0
    if dl == _F0:
        for i in range(n):
            s += wt[o + i] * x[o + i] * x[o + i]
        return np.float64(s)
    idl = _F1 / dl
    flo = np.float32(qlo)
    fhi = np.float32(qhi)
    for i in range(n):
        v = x[o + i]
        q = min(max(np.rint(v * idl), flo), fhi)
        e = dl * q - v
        s += wt[o + i] * e * e
    return np.float64(s)


@njit(nogil=True, cache=True, fastmath=_FM)
def _affine_refine(x, nsub, sub, nmax, smax, st, sc, mi, err, iters, wt):
    """Improve (d, dmin, sc[], m[]) of an affine super-block; keeps only improvements.

    ``st`` holds the f16 bits of d and dmin; ``err`` is per-sub-block squared error scratch,
    ``wt`` per-value weight scratch.
    """
    D = _f16_to_f32(st[0])
    Dm = _f16_to_f32(st[1])
    # llama.cpp's importance weights for this type (what its own search minimises), so a
    # change is kept only when it helps by llama.cpp's measure too: q4_K/q5_K weigh each
    # value by the sub-block's RMS plus |x|, q2_K by |x|.
    for j in range(nsub):
        av = _F0
        if sub == 32:
            for i in range(sub):
                av += x[j * sub + i] * x[j * sub + i]
            av = np.float32(np.sqrt(av / np.float32(sub)))
        for i in range(sub):
            wt[j * sub + i] = av + abs(x[j * sub + i])
    total = 0.0
    for j in range(nsub):
        err[j] = _affine_sse(x, wt, j * sub, sub, D * np.float32(sc[j]), Dm * np.float32(mi[j]), nmax)
        total += err[j]
    for _ in range(iters):
        # Least-squares refit of the two f16 super-scales with codes and sub-scales fixed.
        saa = 0.0
        sab = 0.0
        sbb = 0.0
        sax = 0.0
        sbx = 0.0
        for j in range(nsub):
            dl = D * np.float32(sc[j])
            ml = Dm * np.float32(mi[j])
            fb = np.float64(mi[j])
            for i in range(sub):
                v = x[j * sub + i]
                ww = np.float64(wt[j * sub + i])
                q = 0
                if dl != _F0:
                    q = _rint_clamp((v + ml) / dl, 0, nmax)
                a = np.float64(sc[j] * q)
                saa += ww * a * a
                sab += ww * a * fb
                sbb += ww * fb * fb
                sax += ww * a * v
                sbx += ww * fb * v
        det = saa * sbb - sab * sab
        if det > 1e-30 * saa * sbb and det > 0.0:
            nd = (sax * sbb - sbx * sab) / det
            ndm = (sax * sab - sbx * saa) / det
            h0 = _f32_to_f16(np.float32(nd))
            h1 = _f32_to_f16(np.float32(ndm))
            if h0 != st[0] or h1 != st[1]:
                D2 = _f16_to_f32(h0)
                Dm2 = _f16_to_f32(h1)
                t2 = 0.0
                for j in range(nsub):
                    err[nsub + j] = _affine_sse(x, wt, j * sub, sub, D2 * np.float32(sc[j]),
                                                Dm2 * np.float32(mi[j]), nmax)
                    t2 += err[nsub + j]
                if t2 < total:
                    st[0] = h0
                    st[1] = h1
                    D = D2
                    Dm = Dm2
                    total = t2
                    for j in range(nsub):
                        err[j] = err[nsub + j]
        # Integer sub-scale and sub-min steps, each sub-block on its own.
        for j in range(nsub):
            bs = sc[j]
            bm = mi[j]
            be = err[j]
            for ds in range(-1, 2):
                s2 = sc[j] + ds
                if s2 < 0 or s2 > smax:
                    continue
                for dm in range(-1, 2):
                    m2 = mi[j] + dm
                    if m2 < 0 or m2 > smax or (ds == 0 and dm == 0):
                        continue
                    e = _affine_sse(x, wt, j * sub, sub, D * np.float32(s2), Dm * np.float32(m2), nmax)
                    if e < be:
                        be = e
                        bs = s2
                        bm = m2
            total += be - err[j]
            err[j] = be
            sc[j] = bs
            mi[j] = bm


@njit(nogil=True, cache=True, fastmath=_FM)
def _sym_refine(x, nsub, sub, qlo, qhi, slo, shi, st, sc, L, wt):
    """Improve the sub-block scales of a symmetric super-block; keeps only improvements.

    Per sub-block: one pass gives its error and the least-squares scale for its codes;
    the integer scale nearest that optimum (or the neighbour towards it) is tried.
    (A least-squares refit of d, as done for the affine types, gained almost nothing.)
    Writes the final codes ``q - qlo`` to ``L`` (sub-blocks with a zero scale keep theirs).
    """
    D = _f16_to_f32(st[0])
    if D == _F0:
        return
    flo = np.float32(qlo)
    fhi = np.float32(qhi)
    # llama.cpp's weights for q3_K/q6_K (x squared), as its own scale search uses
    for i in range(nsub * sub):
        wt[i] = x[i] * x[i]
    for j in range(nsub):
        o = j * sub
        dl = D * np.float32(sc[j])
        if dl == _F0:
            continue
        idl = _F1 / dl
        sxq = _F0
        sqq = _F0
        e2 = _F0
        for i in range(sub):
            v = x[o + i]
            q = min(max(np.rint(v * idl), flo), fhi)
            L[o + i] = int(q) - qlo
            sxq += wt[o + i] * v * q
            sqq += wt[o + i] * q * q
            e = dl * q - v
            e2 += wt[o + i] * e * e
        if sqq == _F0:
            continue
        s_opt = sxq / sqq / D
        cand = _rint_clamp(s_opt, slo, shi)
        if cand == sc[j]:
            cand = sc[j] + (1 if s_opt > np.float32(sc[j]) else -1)
            if cand < slo or cand > shi:
                continue
        if cand == 0:
            continue
        dl = D * np.float32(cand)
        if _sym_sse(x, wt, o, sub, dl, qlo, qhi) < np.float64(e2):
            sc[j] = cand
            idl = _F1 / dl
            for i in range(sub):
                L[o + i] = int(min(max(np.rint(x[o + i] * idl), flo), fhi)) - qlo


# ---------------------------------------------------------------- block quantizers


@njit(nogil=True, cache=True)
def _pack_scale_min_k4(sc, mi, out, o):
    for j in range(12):
        out[o + j] = 0
    for j in range(8):
        ls = sc[j]
        lm = mi[j]
        if j < 4:
            out[o + j] = ls
            out[o + j + 4] = lm
        else:
            out[o + j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            out[o + j - 4] |= (ls >> 4) << 6
            out[o + j] |= (lm >> 4) << 6


@njit(nogil=True, cache=True)
def _put_f16(out, o, h):
    out[o] = h & 0xFF
    out[o + 1] = (h >> 8) & 0xFF


@njit(nogil=True, cache=True, fastmath=_FM)
def _block_q45k(x, out, nmax, refine, L, Laux, w, fs, fm, sc, mi, st, err, wt):
    """One q4_K (nmax 15) or q5_K (nmax 31) super-block into out[0:144|176]."""
    if nmax == 15:
        rmin = np.float32(-1.0)
        nstep = 20
    else:
        rmin = np.float32(-0.5)
        nstep = 15
    rdelta = np.float32(0.1)
    max_scale = _F0
    max_min = _F0
    for j in range(8):
        sum_x2 = _F0
        for l in range(32):
            v = x[32 * j + l]
            sum_x2 += v * v
        av_x = np.sqrt(sum_x2 / np.float32(32.0))
        for l in range(32):
            w[l] = av_x + abs(x[32 * j + l])
        s, m = _make_qkx2(32, nmax, x, 32 * j, w, L, Laux, rmin, rdelta, nstep, False)
        fs[j] = s
        fm[j] = m
        if s > max_scale:
            max_scale = s
        if m > max_min:
            max_min = m
    inv_scale = np.float32(63.0) / max_scale if max_scale > _F0 else _F0
    inv_min = np.float32(63.0) / max_min if max_min > _F0 else _F0
    for j in range(8):
        sc[j] = min(63, _nearest(inv_scale * fs[j]) & 0xFF)
        mi[j] = min(63, _nearest(inv_min * fm[j]) & 0xFF)
    st[0] = _f32_to_f16(max_scale / np.float32(63.0))
    st[1] = _f32_to_f16(max_min / np.float32(63.0))
    if refine:
        _affine_refine(x, 8, 32, nmax, 63, st, sc, mi, err, _ITERS[1 if nmax == 31 else 0], wt)
    D = _f16_to_f32(st[0])
    Dm = _f16_to_f32(st[1])
    for j in range(8):
        dl = D * np.float32(sc[j])
        if dl == _F0:
            continue
        ml = Dm * np.float32(mi[j])
        for i in range(32):
            L[32 * j + i] = _rint_clamp((x[32 * j + i] + ml) / dl, 0, nmax)
    _put_f16(out, 0, st[0])
    _put_f16(out, 2, st[1])
    _pack_scale_min_k4(sc, mi, out, 4)
    if nmax == 15:
        for c in range(4):
            for l in range(32):
                out[16 + 32 * c + l] = L[64 * c + l] | (L[64 * c + 32 + l] << 4)
    else:
        for l in range(32):
            h = 0
            for k in range(8):
                h |= (L[32 * k + l] >> 4) << k
            out[16 + l] = h
        for c in range(4):
            for l in range(32):
                out[48 + 32 * c + l] = (L[64 * c + l] & 0xF) | ((L[64 * c + 32 + l] & 0xF) << 4)


@njit(nogil=True, cache=True, fastmath=_FM)
def _block_q6k(x, out, refine, L, fs, sc, st, err, wt, S):
    """One q6_K super-block into out[0:210]."""
    max_scale = _F0
    max_abs = _F0
    _make_qx16(x, L, fs, S)
    for ib in range(16):
        s = fs[ib]
        if abs(s) > max_abs:
            max_abs = abs(s)
            max_scale = s
    if max_abs < _GROUP_MAX_EPS:
        for i in range(210):
            out[i] = 0
        return
    iscale = np.float32(-128.0) / max_scale
    st[0] = _f32_to_f16(_F1 / iscale)
    for ib in range(16):
        sc[ib] = min(127, _nearest(iscale * fs[ib]))
    D = _f16_to_f32(st[0])
    if refine:
        _sym_refine(x, 16, 16, -32, 31, -128, 127, st, sc, L, wt)
    for j in range(16 if not refine else 0):
        dl = D * np.float32(sc[j])
        if dl == _F0:
            continue
        for i in range(16):
            L[16 * j + i] = _rint_clamp(x[16 * j + i] / dl, -32, 31) + 32
    for h in range(2):
        for l in range(32):
            b = 128 * h + l
            q1 = L[b]
            q2 = L[b + 32]
            q3 = L[b + 64]
            q4 = L[b + 96]
            out[64 * h + l] = (q1 & 0xF) | ((q3 & 0xF) << 4)
            out[64 * h + l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4)
            out[128 + 32 * h + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)
    for ib in range(16):
        out[192 + ib] = sc[ib] & 0xFF
    _put_f16(out, 208, st[0])


@njit(nogil=True, cache=True, fastmath=_FM)
def _block_q3k(x, out, refine, L, fs, sc, st, err, wt, A):
    """One q3_K super-block into out[0:110]."""
    max_scale = _F0
    amax = _F0
    _make_q3x16(x, L, fs, A)
    for j in range(16):
        s = fs[j]
        if abs(s) > amax:
            amax = abs(s)
            max_scale = s
    if max_scale != _F0:
        iscale = np.float32(-32.0) / max_scale
        for j in range(16):
            l = _nearest(iscale * fs[j])
            # ggml stores the rounded value in an int8 before clamping it
            l = ((l + 128) & 0xFF) - 128
            sc[j] = max(-32, min(31, l))
        st[0] = _f32_to_f16(_F1 / iscale)
    else:
        for j in range(16):
            sc[j] = -32
        st[0] = 0
    D = _f16_to_f32(st[0])
    if refine and max_scale != _F0:
        _sym_refine(x, 16, 16, -4, 3, -32, 31, st, sc, L, wt)
    for j in range(16 if not refine else 0):
        dl = D * np.float32(sc[j])
        if dl == _F0:
            continue
        idl = _F1 / dl
        for i in range(16):
            L[16 * j + i] = _rint_clamp(x[16 * j + i] * idl, -4, 3) + 4
    for i in range(96, 108):
        out[i] = 0
    for j in range(16):
        l = sc[j] + 32
        if j < 8:
            out[96 + j] = l & 0xF
        else:
            out[96 + j - 8] |= (l & 0xF) << 4
        out[96 + 8 + j % 4] |= (l >> 4) << (2 * (j // 4))
    for l in range(32):
        h = 0
        for k in range(8):
            h |= (L[32 * k + l] >> 2) << k
        out[l] = h
    for h in range(2):
        for l in range(32):
            b = 128 * h + l
            out[32 + 32 * h + l] = ((L[b] & 3) | ((L[b + 32] & 3) << 2) | ((L[b + 64] & 3) << 4)
                                    | ((L[b + 96] & 3) << 6))
    _put_f16(out, 108, st[0])


@njit(nogil=True, cache=True, fastmath=_FM)
def _block_q2k(x, out, refine, L, A, fs, fm, sc, mi, st, err, wt):
    """One q2_K super-block into out[0:84]."""
    max_scale = _F0
    max_min = _F0
    for j in range(16):
        for l in range(16):
            A[_K_WT + 16 * l + j] = abs(x[16 * j + l])
    _make_qkx2_lanes(x, 16, 16, 3, np.float32(-0.5), np.float32(0.1), 15, A, L, fs, fm)
    for j in range(16):
        s = fs[j]
        m = fm[j]
        if s > max_scale:
            max_scale = s
        if m > max_min:
            max_min = m
    q4 = np.float32(15.0)
    if max_scale > _F0:
        iscale = q4 / max_scale
        for j in range(16):
            sc[j] = _nearest(iscale * fs[j]) & 0xF
        st[0] = _f32_to_f16(max_scale / q4)
    else:
        for j in range(16):
            sc[j] = 0
        st[0] = 0
    if max_min > _F0:
        iscale = q4 / max_min
        for j in range(16):
            mi[j] = _nearest(iscale * fm[j]) & 0xF
        st[1] = _f32_to_f16(max_min / q4)
    else:
        for j in range(16):
            mi[j] = 0
        st[1] = 0
    if refine:
        _affine_refine(x, 16, 16, 3, 15, st, sc, mi, err, _ITERS[2], wt)
    D = _f16_to_f32(st[0])
    Dm = _f16_to_f32(st[1])
    for j in range(16):
        dl = D * np.float32(sc[j])
        if dl == _F0:
            continue
        ml = Dm * np.float32(mi[j])
        for i in range(16):
            L[16 * j + i] = _rint_clamp((x[16 * j + i] + ml) / dl, 0, 3)
    for j in range(16):
        out[j] = sc[j] | (mi[j] << 4)
    for h in range(2):
        for l in range(32):
            b = 128 * h + l
            out[16 + 32 * h + l] = L[b] | (L[b + 32] << 2) | (L[b + 64] << 4) | (L[b + 96] << 6)
    _put_f16(out, 80, st[0])
    _put_f16(out, 82, st[1])


# ------------------------------------------------------------------ row kernels


@njit(nogil=True, cache=True, fastmath=_FM, parallel=True)
def _quantize_rows(x, mode, lut, kind, refine, out, nchunks):
    """Quantize every 256-weight block of the 2-D bit array ``x`` into ``out``.

    kind: 2..6 for q2_K..q6_K. Returns the number of blocks holding NaN/Inf.
    """
    nrows = x.shape[0]
    nb = x.shape[1] // QK_K
    ts = out.shape[1] // max(nb, 1)
    total = nrows * nb
    bad = np.zeros(nchunks, np.int64)
    for c in prange(nchunks):
        start = c * total // nchunks
        end = (c + 1) * total // nchunks
        ubuf = np.empty(QK_K, np.uint32)
        xb = ubuf.view(np.float32)
        L = np.zeros(QK_K, np.int32)
        fs = np.zeros(16, np.float32)
        fm = np.zeros(16, np.float32)
        sc = np.zeros(16, np.int32)
        mi = np.zeros(16, np.int32)
        st = np.zeros(2, np.int32)
        err = np.zeros(32, np.float64)
        wt = np.zeros(QK_K, np.float32)  # per-thread scratch, not one allocation per block
        A = np.zeros(LANE_SCRATCH, np.float32)
        Laux = np.zeros(32, np.int32)
        w = np.zeros(32, np.float32)
        S = np.zeros((9, QK_K), np.float32)
        for blk in range(start, end):
            r = blk // nb
            b = blk - r * nb
            ob = out[r, b * ts:(b + 1) * ts]
            if not _load(x, r, b * QK_K, mode, lut, ubuf):
                bad[c] += 1
                continue
            if kind == 4:
                _block_q45k(xb, ob, 15, refine, L, Laux, w, fs, fm, sc, mi, st, err, wt)
            elif kind == 5:
                _block_q45k(xb, ob, 31, refine, L, Laux, w, fs, fm, sc, mi, st, err, wt)
            elif kind == 6:
                _block_q6k(xb, ob, refine, L, fs, sc, st, err, wt, S)
            elif kind == 3:
                _block_q3k(xb, ob, refine, L, fs, sc, st, err, wt, A)
            else:
                _block_q2k(xb, ob, refine, L, A, fs, fm, sc, mi, st, err, wt)
    return bad.sum()


@njit(nogil=True, cache=True, inline="always")
def _scale_min_k4(q, o, j):
    if j < 4:
        return q[o + j] & 63, q[o + j + 4] & 63
    return ((q[o + j + 4] & 0xF) | ((q[o + j - 4] >> 6) << 4),
            (q[o + j + 4] >> 4) | ((q[o + j] >> 6) << 4))


@njit(nogil=True, cache=True, inline="always")
def _get_f16(q, o):
    return _f16_to_f32(np.int32(q[o]) | (np.int32(q[o + 1]) << 8))


@njit(nogil=True, cache=True, parallel=True)
def _dequantize_rows(blocks, kind, out):
    """Inverse of _quantize_rows; the float32 arithmetic follows gguf.quants op for op."""
    nrows = out.shape[0]
    nb = out.shape[1] // QK_K
    ts = blocks.shape[1] // max(nb, 1)
    total = nrows * nb
    for blk in prange(total):
        r = blk // nb
        b = blk - r * nb
        q = blocks[r, b * ts:(b + 1) * ts]
        y = out[r, b * QK_K:(b + 1) * QK_K]
        if kind == 4 or kind == 5:
            d = _get_f16(q, 0)
            dmin = _get_f16(q, 2)
            qs = 16 if kind == 4 else 48
            for j in range(8):
                s, m = _scale_min_k4(q, 4, j)
                dl = d * np.float32(s)
                ml = dmin * np.float32(m)
                c = j // 2
                sh = 4 * (j % 2)
                for l in range(32):
                    v = (q[qs + 32 * c + l] >> sh) & 0xF
                    if kind == 5:
                        v |= ((q[16 + l] >> j) & 1) << 4
                    y[32 * j + l] = dl * np.float32(v) - ml
        elif kind == 6:
            d = _get_f16(q, 208)
            for e in range(QK_K):
                h = e // 128
                r2 = e % 128
                lo = (q[64 * h + r2 % 64] >> (4 * (r2 // 64))) & 0xF
                hi = (q[128 + 32 * h + r2 % 32] >> (2 * (r2 // 32))) & 3
                sv = np.int32(q[192 + e // 16])
                if sv > 127:
                    sv -= 256
                dl = d * np.float32(sv)
                y[e] = dl * np.float32(np.int32(lo | (hi << 4)) - 32)
        elif kind == 3:
            d = _get_f16(q, 108)
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
        else:
            d = _get_f16(q, 80)
            dmin = _get_f16(q, 82)
            for j in range(16):
                dl = d * np.float32(q[j] & 0xF)
                ml = dmin * np.float32(q[j] >> 4)
                for l in range(16):
                    e = 16 * j + l
                    h = e // 128
                    r2 = e % 128
                    v = (q[16 + 32 * h + r2 % 32] >> (2 * (r2 // 32))) & 3
                    y[e] = dl * np.float32(v) - ml


# --------------------------------------------------------------------- public API

_F16_LUT = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(
    np.float32).view(np.uint32)
_NO_LUT = np.zeros(1, np.uint32)
_KIND = {"q2_k": 2, "q3_k": 3, "q4_k": 4, "q5_k": 5, "q6_k": 6}


def _bits_2d(array: np.ndarray, name: str) -> tuple[np.ndarray, int, np.ndarray]:
    """A 2-D view of the raw bits of ``array`` (no f32 copy) and the widening mode."""
    arr = np.asarray(array)
    if arr.ndim == 0:
        raise KQuantError(f"{name}: expected an array with a last axis, found a scalar")
    n = arr.shape[-1]
    if n == 0 or n % QK_K:
        raise KQuantError(
            f"{name}: row length must be a multiple of {QK_K}, found {n} (shape {arr.shape})")
    kind = convcore.dtype_name(arr.dtype) if arr.dtype.kind in "fV" else str(arr.dtype)
    if kind not in ("f32", "f16", "bf16"):
        raise KQuantError(f"{name}: expected f32, f16 or bf16 input, found {arr.dtype}")
    arr = np.ascontiguousarray(arr).reshape(-1, n)
    if kind == "f32":
        return arr.view(np.uint32), 0, _NO_LUT
    if kind == "f16":
        return arr.view(np.uint16), 1, _F16_LUT
    return arr.view(np.uint16), 2, _NO_LUT


def quantize_kquant(array: np.ndarray, name: str, refine: bool = True) -> dict[str, np.ndarray]:
    """Quantize ``array`` (last axis = rows of 256k weights) to ggml ``name`` blocks.

    :returns: ``{"blocks": uint8 array of shape (*shape[:-1], row_blocks * type_size)}``.
    :raises KQuantError: (a ValueError) on a bad row length, dtype, NaN or Inf.
    """
    bits, mode, lut = _bits_2d(array, name)
    shape = np.shape(array)
    nb = shape[-1] // QK_K
    out = faulted_empty((bits.shape[0], nb * TYPE_SIZE[name]), np.uint8)
    total = bits.shape[0] * nb
    nchunks = max(1, min(total, 256))
    if total:
        # chunks handed out one at a time rather than split in halves up front: on a
        # shared 2-core VM one thread often runs slower, and q3_k's time then varied by
        # 1.5x from run to run with the static split (measured: 434-647 MB/s against
        # 643-654 dynamic)
        with numba.parallel_chunksize(1):
            bad = _quantize_rows(bits, mode, lut, _KIND[name], refine, out, nchunks)
        if bad:
            raise KQuantError(f"{name}: NaN or Inf in input ({bad} of {total} blocks)")
    return {"blocks": out.reshape(*shape[:-1], nb * TYPE_SIZE[name])}


def dequantize_kquant(data: dict[str, np.ndarray], shape: tuple[int, ...], name: str) -> np.ndarray:
    """float32 array of ``shape`` from ``data["blocks"]``, equal to gguf.quants.dequantize."""
    shape = tuple(int(s) for s in shape)
    n = shape[-1]
    if n % QK_K:
        raise KQuantError(f"{name}: row length must be a multiple of {QK_K}, found {n}")
    nb = n // QK_K
    ts = TYPE_SIZE[name]
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    blocks = np.ascontiguousarray(data["blocks"], dtype=np.uint8)
    if blocks.size != rows * nb * ts:
        raise KQuantError(
            f"{name}: expected {rows * nb * ts} block bytes for shape {shape}, found {blocks.size}")
    out = np.empty((rows, n), np.float32)
    if rows and nb:
        _dequantize_rows(blocks.reshape(rows, nb * ts), _KIND[name], out)
    return out.reshape(shape)


def _scheme(name: str) -> convcore.Scheme:
    def quantize(array: np.ndarray) -> dict[str, np.ndarray]:
        return quantize_kquant(array, name)

    def dequantize(data: dict[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        return dequantize_kquant(data, shape, name)

    quantize.__doc__ = f"{name} blocks ({TYPE_SIZE[name]} B per 256 weights) of an f32/f16/bf16 array."
    dequantize.__doc__ = f"float32 values of {name} blocks, as gguf.quants.dequantize gives them."
    return convcore.Scheme(
        name=name, quantize=quantize, dequantize=dequantize, block_size=QK_K,
        bits=BITS[name], family="gguf",
        description=f"GGUF {name.upper()} k-quant, {BITS[name]:.4g} bits per weight",
    )


SCHEMES: list[convcore.Scheme] = [_scheme(n) for n in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")]
