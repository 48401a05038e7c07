"""llama.cpp's scale searches with an importance matrix, in float32.

With ``quant_weights`` llama.cpp's quantizers (``quantize_row_*_impl``) weigh each value
by its column's importance and call searches that take the weights as given:

- ``make_qx_w``: ``make_qx_quants`` (rmse_type 1) with weights, one group at a time
  (q4_0, q5_0, and q3_K's super-scale over its 16 sub-scales);
- ``make_qx16_w``: the same for the 16 sub-blocks of a super-block at once, as vector
  lanes (q3_K with codes -4..3, q6_K with -32..31);
- ``make_qp``: ``make_qp_quants``, the search for the integer sub-scales (and sub-mins)
  under one super-scale, weighted by each sub-block's summed weight (q2_K, q4_K, q5_K).

- ``make_qkx3``: ``make_qkx3_quants``, the affine search (a scale and a min) of q2_K,
  q4_K, q5_K, q4_1 and q5_1.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from . import _cache  # noqa: F401  (the kernel cache, before any @njit here)
from .kquant_bits import F0, F1, rint_clamp
from .kquant_search import GROUP_MAX_EPS

# make_qkx3_quants' steps as llama.cpp calls it with weights: rmin, rdelta, nstep
QKX3 = (np.float32(-0.9), np.float32(0.05), 36)


# Everything here runs without fast-math (fastmath=False is explicit: a kernel without the
# option takes its caller's): float32 sums in llama.cpp's order, products unfused, true
# divisions, so each choice of the searches, and so each block's bytes, is the one
# llama.cpp makes. (The refinement after them is free to round otherwise.)


@njit(nogil=True, cache=True, fastmath=False)
def spread(x, o, n, factor):
    """factor * sum(x[o:o+n]**2) / n, llama.cpp's sigma2 for the weights."""
    s = F0
    for i in range(n):
        s += x[o + i] * x[o + i]
    return np.float32(factor) * s / np.float32(n)


@njit(nogil=True, cache=True, fastmath=False)
def spread_weights(x, o, n, qw, qo, sigma2, wt):
    """wt[0:n] = qw[qo:qo+n] * sqrt(sigma2 + x[o:o+n]**2): each value's weight in
    llama.cpp's searches with an importance matrix, its column's importance times the
    value's magnitude above the spread sigma2."""
    for i in range(n):
        v = x[o + i]
        wt[i] = qw[qo + i] * np.sqrt(sigma2 + v * v)


@njit(nogil=True, cache=True, fastmath=False)
def qx_iscale(nmax, step, mx):
    """make_qx_quants' inverse scale of step ``step``: -(nmax + 0.1*step) / mx."""
    return -(np.float32(nmax) + np.float32(0.1) * np.float32(step)) / mx


@njit(nogil=True, cache=True, fastmath=False)
def make_qkx3(n, nmax, x, xo, w, L, Laux):
    """make_qkx3_quants(n, nmax, rmin -0.9, rdelta 0.05, nstep 36, squared error) of
    x[xo:xo+n] weighted by w[0:n]: returns (scale, -min); codes 0..nmax into L[xo:xo+n],
    Laux[0:n] scratch.

    kquant_search.make_qkx2 with these steps, except that each candidate's error is summed
    value by value, as llama.cpp sums it: the expanded form make_qkx2 uses loses digits to
    cancellation when the error is small, and then ranks close candidates otherwise.
    """
    rmin, rdelta, nstep = QKX3
    fmax = np.float32(nmax)
    mn = x[xo]
    mx = x[xo]
    sum_w = F0
    sum_x = F0
    for i in range(n):
        v = x[xo + i]
        mn = min(mn, v)
        mx = max(mx, v)
        sum_w += w[i]
        sum_x += w[i] * v
    if mn > F0:
        mn = F0
    if mx <= mn:
        for i in range(n):
            L[xo + i] = 0
        return F0, -mn
    iscale = fmax / (mx - mn)
    scale = F1 / iscale
    best = F0
    for i in range(n):
        l = rint_clamp(iscale * (x[xo + i] - mn), 0, nmax)
        L[xo + i] = l
        d = scale * np.float32(l) + mn - x[xo + i]
        best += w[i] * d * d
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * np.float32(step) + fmax) / (mx - mn)
        sum_l = F0
        sum_l2 = F0
        sum_xl = F0
        for i in range(n):
            l = rint_clamp(iscale * (x[xo + i] - mn), 0, nmax)
            Laux[i] = l
            fl = np.float32(l)
            sum_l += w[i] * fl
            sum_l2 += w[i] * fl * fl
            sum_xl += w[i] * fl * x[xo + i]
        dd = sum_w * sum_l2 - sum_l * sum_l
        if dd > F0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / dd
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / dd
            if this_min > F0:
                this_min = F0
                this_scale = sum_xl / sum_l2
            cur = F0
            for i in range(n):
                d = this_scale * np.float32(Laux[i]) + this_min - x[xo + i]
                cur += w[i] * d * d
            if cur < best:
                for i in range(n):
                    L[xo + i] = Laux[i]
                best = cur
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(nogil=True, cache=True, fastmath=False)
def make_qx_w(n, nmax, x, xo, w, wo, L, lo):
    """make_qx_quants(n, nmax, rmse_type 1) of x[xo:xo+n] weighted by w[wo:wo+n]: returns
    the scale; codes l + nmax (l in -nmax..nmax-1) into L[lo:lo+n].

    The value of largest magnitude sets the first inverse scale, -nmax/max; 18 more
    around it are tried, each code set scored by its weighted least-squares fit, and the
    best one's least-squares scale is returned. An all-small group: codes 0, scale 0.
    """
    fnmax = np.float32(nmax)
    flo = -fnmax
    fhi = fnmax - F1
    mx = F0
    amax = F0
    for i in range(n):
        a = abs(x[xo + i])
        if a > amax:
            amax = a
            mx = x[xo + i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[lo + i] = 0
        return F0
    best_is = qx_iscale(nmax, 0, mx)
    scale = F0
    best = F0
    for k in range(19):  # k = 0: the first scale; then steps -9..-1, 1..9
        step = k - 10 if k <= 9 else k - 9
        iscale = qx_iscale(nmax, step, mx) if k else best_is
        sumlx = F0
        suml2 = F0
        for i in range(n):
            v = x[xo + i]
            fl = min(max(np.rint(iscale * v), flo), fhi)
            sumlx += w[wo + i] * v * fl
            suml2 += w[wo + i] * fl * fl
        if k == 0:
            scale = sumlx / suml2 if suml2 != F0 else F0
            best = scale * sumlx
        elif suml2 > F0 and sumlx * sumlx > best * suml2:
            scale = sumlx / suml2
            best = scale * sumlx
            best_is = iscale
    for i in range(n):
        L[lo + i] = nmax + rint_clamp(best_is * x[xo + i], -nmax, nmax - 1)
    return scale


# make_qx16_w's scratch: one flat float32 array with regions at fixed offsets (see
# kquant_search on why not a 2-D array). 256 each, transposed (value i of sub-block j at
# 16*i + j): x, weight, weight*x; then one float per lane: value of largest magnitude,
# inverse scale tried, best inverse scale, best score, sum w x l, sum w l**2.
_XT, _WT, _WX = 0, 256, 512
_MX, _CIS, _BIS, _BEST, _SLX, _SL2 = (768 + 16 * k for k in range(6))
QX16_SCRATCH = 768 + 16 * 6


@njit(nogil=True, cache=True, error_model="numpy", fastmath=False)
def make_qx16_w(x, W, wo, nmax, L, fs, A):
    """make_qx_w(16, nmax) for each of the 16 sub-blocks of x[0:256], weighted by
    W[wo:wo+256], the sub-blocks as vector lanes: scales into fs[0:16], codes + nmax into
    L[0:256]. A: float32 scratch of at least QX16_SCRATCH, laid out as the offsets above.
    """
    fnmax = np.float32(nmax)
    flo = -fnmax
    fhi = fnmax - F1
    for j in range(16):
        m = F0
        a = F0
        for i in range(16):
            v = x[16 * j + i]
            if abs(v) > a:
                a = abs(v)
                m = v
        A[_MX + j] = m if a >= GROUP_MAX_EPS else F0
        for i in range(16):
            v = x[16 * j + i]
            wv = W[wo + 16 * j + i]
            A[_XT + 16 * i + j] = v
            A[_WT + 16 * i + j] = wv
            A[_WX + 16 * i + j] = wv * v
    for k in range(19):
        step = k - 10 if k <= 9 else k - 9
        for j in range(16):
            A[_CIS + j] = qx_iscale(nmax, step if k else 0, A[_MX + j]) if A[_MX + j] != F0 else F0
            A[_SLX + j] = F0
            A[_SL2 + j] = F0
        for i in range(16):
            o = 16 * i
            for j in range(16):
                fl = min(max(np.rint(A[_CIS + j] * A[_XT + o + j]), flo), fhi)
                A[_SLX + j] += A[_WX + o + j] * fl
                A[_SL2 + j] += A[_WT + o + j] * fl * fl
        for j in range(16):
            slx = A[_SLX + j]
            sl2 = A[_SL2 + j]
            if k == 0 or (sl2 > F0 and slx * slx > A[_BEST + j] * sl2):
                sc = slx / sl2 if sl2 != F0 else F0
                fs[j] = sc
                A[_BEST + j] = sc * slx
                A[_BIS + j] = A[_CIS + j]
    for j in range(16):
        if A[_MX + j] == F0:
            fs[j] = F0
            for i in range(16):
                L[16 * j + i] = 0
        else:
            bis = A[_BIS + j]
            for i in range(16):
                L[16 * j + i] = nmax + rint_clamp(bis * x[16 * j + i], -nmax, nmax - 1)


@njit(nogil=True, cache=True, fastmath=False)
def make_qp(n, nmax, x, w, L):
    """make_qp_quants: integer codes 0..nmax into L[0:n] for the non-negative x[0:n] (the
    sub-blocks' float scales or mins) under one scale, which is returned; w[0:n] weighs
    each (the sub-block's summed weight).

    Inverse scales nmax/max + 0.1*k/max (k = -4..4) are ranked by weighted squared error,
    the best one's codes refitted by least squares, then up to 5 sweeps move single codes
    to where the fit puts them while that raises the fit's score. llama.cpp leaves a
    negative input's code negative (it is stored in a uint8); here it is clamped to 0.
    """
    fnmax = np.float32(nmax)
    mx = F0
    for i in range(n):
        mx = max(mx, x[i])
    if mx < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F0
    iscale = fnmax / mx
    scale = F1 / iscale
    best = F0
    for i in range(n):
        d = x[i] - scale * np.rint(iscale * x[i])  # the first scale's codes are not clamped
        best += w[i] * d * d
    for k in range(-4, 5):
        if k == 0:
            continue
        isc = (np.float32(0.1) * np.float32(k) + fnmax) / mx
        sc = F1 / isc
        mse = F0
        for i in range(n):
            d = x[i] - sc * min(np.rint(isc * x[i]), fnmax)
            mse += w[i] * d * d
        if mse < best:
            best = mse
            iscale = isc
    sumlx = F0
    suml2 = F0
    for i in range(n):
        l = rint_clamp(iscale * x[i], 0, nmax)
        L[i] = l
        fl = np.float32(l)
        sumlx += w[i] * x[i] * fl
        suml2 += w[i] * fl * fl
    for _ in range(5):
        changed = 0
        for i in range(n):
            fl = np.float32(L[i])
            slx = sumlx - w[i] * x[i] * fl
            sl2 = suml2 - w[i] * fl * fl
            if slx > F0 and sl2 > F0:
                nl = rint_clamp(x[i] * sl2 / slx, 0, nmax)
                if nl != L[i]:
                    fn = np.float32(nl)
                    slx += w[i] * x[i] * fn
                    sl2 += w[i] * fn * fn
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = nl
                        sumlx = slx
                        suml2 = sl2
                        changed += 1
        if changed == 0:
            break
    return sumlx / suml2 if suml2 > F0 else F0
