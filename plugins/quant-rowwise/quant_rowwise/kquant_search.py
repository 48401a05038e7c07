"""llama.cpp's scale searches for the k-quants (no importance matrix), in float32.

``make_qkx2`` is ``make_qkx2_quants`` one sub-block at a time (q4_K, q5_K);
``make_qkx2_lanes`` (q2_K), ``make_qx16`` (``make_qx_quants``, q6_K) and ``make_q3x16``
(``make_q3_quants``, q3_K) run the 16 sub-blocks of a super-block as vector lanes. Each
finds per-sub-block float scales (and mins) and the codes they give; the packers in
kquant_pack.py turn those into the block's integer sub-scales under an f16 super-scale.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from . import _cache  # noqa: F401  (the kernel cache, before any @njit here)
from .kquant_bits import F0, F1, FM, rint_clamp

# ggml's GROUP_MAX_EPS: a sub-block whose largest magnitude is below it is all zeros
GROUP_MAX_EPS = np.float32(1e-15)


@njit(nogil=True, cache=True, fastmath=FM)
def make_qkx2(n, nmax, x, xo, w, L, Laux, rmin, rdelta, nstep, use_mad):
    """Affine (scale, -min) for x[xo:xo+n] with codes 0..nmax, as make_qkx2_quants.

    w[0:n]: the values' weights (in); L[xo:xo+n]: the best codes so far (out);
    Laux[0:n]: the codes of the scale being tried (scratch). use_mad: rank by weighted
    absolute error, as llama.cpp does, instead of weighted squared error.
    """
    fmax = np.float32(nmax)
    mn = x[xo]
    mx = x[xo]
    sum_w = F0
    sum_x = F0
    sum_x2 = F0
    for i in range(n):
        v = x[xo + i]
        mn = min(mn, v)
        mx = max(mx, v)
        sum_w += w[i]
        sum_x += w[i] * v
        sum_x2 += w[i] * v * v
    if mn > F0:
        mn = F0
    if mx == mn:
        for i in range(n):
            L[xo + i] = 0
        return F0, -mn
    iscale = fmax / (mx - mn)
    scale = F1 / iscale
    best = F0
    for i in range(n):
        l = rint_clamp(iscale * (x[xo + i] - mn), 0, nmax)
        L[xo + i] = l
        diff = scale * np.float32(l) + mn - x[xo + i]
        diff = abs(diff) if use_mad else diff * diff
        best += w[i] * diff
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * np.float32(step) + fmax) / (mx - mn)
        sum_l = F0
        sum_l2 = F0
        sum_xl = F0
        for i in range(n):
            l = rint_clamp(iscale * (x[xo + i] - mn), 0, nmax)
            Laux[i] = l
            fl = np.float32(l)
            wl = w[i] * fl
            sum_l += wl
            sum_l2 += wl * fl
            sum_xl += wl * x[xo + i]
        dd = sum_w * sum_l2 - sum_l * sum_l
        if dd > F0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / dd
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / dd
            if this_min > F0:
                this_min = F0
                this_scale = sum_xl / sum_l2
            if use_mad:
                cur = F0
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
# search is done for all lanes at once, each lane's sums running over its values in order;
# LLVM leaves the one-sub-block-at-a-time loops of make_qkx2 scalar at 16 values.
# The scratch is one flat float32 array with regions at fixed offsets, which LLVM can tell
# apart (rows of a 2-D array it could not), and the numpy error model drops the
# division-by-zero checks that kept such loops scalar. q4_K/q5_K's 8 sub-blocks of 32
# values would fill only half of each vector, so they keep make_qkx2 (see
# docs/benchmarks.md).
# Regions of 256, transposed: values, weights (written by the caller, hence public), best
# codes, codes of the scale being tried.
_K_XT, K_WT, _K_LT, _K_LA = 0, 256, 512, 768
# One float per lane: min (then the fitted min), max, sum w, sum w x, sum w x**2, best
# scale, best error, inverse scale tried, sum w l, sum w l**2, sum w x l, 1 if the
# sub-block is not constant, 1 if this step's fit was kept.
(_K_MN, _K_MX, _K_SW, _K_SX, _K_SX2, _K_SCALE, _K_BEST, _K_IS, _K_SL, _K_SL2, _K_SXL, _K_LIVE,
 _K_ACC) = (1024 + 16 * k for k in range(13))


@njit(nogil=True, cache=True, error_model="numpy", fastmath=FM)
def make_qkx2_lanes(x, nsub, sub, nmax, rmin, rdelta, nstep, A, L, fs, fm):
    """make_qkx2_quants (squared error) for the nsub sub-blocks of ``sub`` values in
    x[0:nsub*sub], whose weights the caller has put at A[K_WT + i*nsub + j]: per
    sub-block j the scale into fs[j], the min (negated, as llama.cpp returns it) into fm[j]
    and codes 0..nmax into L.

    A: float32 scratch of LANE_SCRATCH, laid out as the _K_* offsets above; L: int32 codes
    (out, sub-block j at L[j*sub:(j+1)*sub]); fs, fm: float32[nsub] (out).

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
        A[_K_SW + j] = F0
        A[_K_SX + j] = F0
        A[_K_SX2 + j] = F0
    for i in range(sub):
        o = i * nsub
        for j in range(nsub):
            v = A[_K_XT + o + j]
            w = A[K_WT + o + j]
            A[_K_MN + j] = min(A[_K_MN + j], v)
            A[_K_MX + j] = max(A[_K_MX + j], v)
            A[_K_SW + j] += w
            A[_K_SX + j] += w * v
            A[_K_SX2 + j] += w * v * v
    for j in range(nsub):
        mn = min(A[_K_MN + j], F0)
        A[_K_MN + j] = mn
        live = A[_K_MX + j] != mn  # not: a constant sub-block, codes 0 and scale 0
        isc = fmax / (A[_K_MX + j] - mn)
        A[_K_LIVE + j] = F1 if live else F0
        A[_K_IS + j] = isc if live else F0
        A[_K_SCALE + j] = F1 / isc if live else F0
        A[_K_BEST + j] = F0
    for i in range(sub):
        o = i * nsub
        for j in range(nsub):
            v = A[_K_XT + o + j]
            q = min(max(np.rint(A[_K_IS + j] * (v - A[_K_MN + j])), F0), fmax)
            A[_K_LT + o + j] = q
            d = A[_K_SCALE + j] * q + A[_K_MN + j] - v
            A[_K_BEST + j] += A[K_WT + o + j] * (d * d)
    for step in range(nstep + 1):
        for j in range(nsub):
            A[_K_IS + j] = (rmin + rdelta * np.float32(step) + fmax) / (A[_K_MX + j] - A[_K_MN + j])
            A[_K_SL + j] = F0
            A[_K_SL2 + j] = F0
            A[_K_SXL + j] = F0
        for i in range(sub):
            o = i * nsub
            for j in range(nsub):
                v = A[_K_XT + o + j]
                q = min(max(np.rint(A[_K_IS + j] * (v - A[_K_MN + j])), F0), fmax)
                A[_K_LA + o + j] = q
                wq = A[K_WT + o + j] * q
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
            pos = tm > F0
            tm = F0 if pos else tm
            ts = sxl / sl2 if pos else ts
            # sum w (s q + m - x)**2 expanded, so no second pass over the values
            t64 = np.float64(ts)
            m64 = np.float64(tm)
            cur = np.float32(t64 * t64 * sl2 + 2.0 * t64 * m64 * sl + m64 * m64 * sw
                             - 2.0 * t64 * sxl - 2.0 * m64 * sx + A[_K_SX2 + j])
            keep = (A[_K_LIVE + j] != F0) & (dd > F0) & (cur < A[_K_BEST + j])
            A[_K_ACC + j] = F1 if keep else F0
            A[_K_BEST + j] = cur if keep else A[_K_BEST + j]
            A[_K_SCALE + j] = ts if keep else A[_K_SCALE + j]
            A[_K_MN + j] = tm if keep else A[_K_MN + j]
        for i in range(sub):
            o = i * nsub
            for j in range(nsub):
                A[_K_LT + o + j] = A[_K_LA + o + j] if A[_K_ACC + j] != F0 else A[_K_LT + o + j]
    for j in range(nsub):
        live = A[_K_LIVE + j] != F0
        fs[j] = A[_K_SCALE + j] if live else F0
        fm[j] = -A[_K_MN + j]
        for i in range(sub):
            L[j * sub + i] = int(A[_K_LT + i * nsub + j]) if live else 0


# q6_K's and q3_K's scale searches run the 16 sub-blocks of a super-block as vector lanes.
# llama.cpp searches one 16-value sub-block at a time, and LLVM does not vectorise those
# short loops; here the super-block is transposed (value i of sub-block j at 16*i + j) and
# each step of the search is done for all 16 sub-blocks at once, each lane's sums still
# running over its values in order.


@njit(nogil=True, cache=True, fastmath=FM)
def make_qx16(x, L, fs, S):
    """make_qx_quants(16, nmax=32, rmse_type 1), q6_K's scale search, for all 16 sub-blocks
    of the super-block x[0:256] at once: scales into fs[0:16], codes + 32 into L.

    llama.cpp searches one sub-block at a time: an initial scale -32/max, then 18 more
    around it, each scoring its 16 codes by the x**2-weighted least squares fit. Here the
    16 sub-blocks are the vector lanes (x transposed into S[0], so lane j reads sub-block j)
    and every candidate is scored for all of them in one pass; each lane's sums still run
    over its values in order, since LLVM does not vectorise the per-sub-block loop's
    16-value reductions.

    S: float32 scratch (9, 256), rows: x transposed, x**2 and x**3 (transposed), then one
    per lane in the first 16 entries: value of largest magnitude, inverse scale tried, best
    inverse scale, best score, sum x**3 l, sum x**2 l**2.
    """
    nmax = 32
    fnmax = np.float32(nmax)
    flo = -fnmax
    fhi = fnmax - F1
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
        m = F0
        a = F0
        for i in range(16):
            v = x[16 * j + i]
            if abs(v) > a:
                a = abs(v)
                m = v
        mx[j] = m if a >= GROUP_MAX_EPS else F0
        for i in range(16):
            v = x[16 * j + i]
            xt[16 * i + j] = v
            w2[16 * i + j] = v * v
            w3[16 * i + j] = v * v * v
    for k in range(19):  # k = 0: the initial scale; then steps -9..-1, 1..9
        step = k - 10 if k <= 9 else k - 9
        num = -(fnmax + np.float32(0.1) * np.float32(step)) if k else -fnmax
        for j in range(16):
            cis[j] = num / mx[j] if mx[j] != F0 else F0
            slx[j] = F0
            sl2[j] = F0
        for i in range(16):
            o = 16 * i
            for j in range(16):
                fl = min(max(np.rint(cis[j] * xt[o + j]), flo), fhi)
                slx[j] += w3[o + j] * fl
                sl2[j] += w2[o + j] * fl * fl
        for j in range(16):
            if k == 0 or (sl2[j] > F0 and slx[j] * slx[j] > best[j] * sl2[j]):
                sc = slx[j] / sl2[j] if sl2[j] != F0 else F0
                fs[j] = sc
                best[j] = sc * slx[j]
                bis[j] = cis[j]
    for j in range(16):
        if mx[j] == F0:
            fs[j] = F0
            for i in range(16):
                L[16 * j + i] = 0
        else:
            for i in range(16):
                L[16 * j + i] = nmax + int(min(max(np.rint(bis[j] * x[16 * j + i]), flo), fhi))


# make_q3x16's scratch: one flat float32 array with its regions at fixed offsets. Rows of
# a 2-D array (as make_qx16 uses) hid from LLVM that the regions do not overlap, and with
# Numba's default (Python) error model the division-by-zero checks kept the sweep scalar.
_XT, _W2, _W3, _LT = 0, 256, 512, 768      # 256 each, transposed: x, x**2, x**3, codes
# per lane: value of largest magnitude, inverse scale (|that value| while it is sought),
# sum x**3 l, sum x**2 l**2
_MX, _CIS, _SX, _S2 = 1024, 1040, 1056, 1072
LANE_SCRATCH = 1024 + 16 * 13  # room for the larger layout, make_qkx2_lanes'


@njit(nogil=True, cache=True, error_model="numpy", fastmath=FM)
def make_q3x16(x, L, fs, A):
    """make_q3_quants(16, nmax=4, do_rmse=true), q3_K's search, for the 16 sub-blocks of
    x[0:256]: scales into fs[0:16], codes + 4 into L.

    llama.cpp rounds every value at -4/max, then sweeps the values in order up to 5 times,
    moving a code to the one its least-squares scale suggests when that lowers the
    x**2-weighted error, and stops after a sweep that changed nothing. The lanes sweep
    together until no lane changes: a sweep that changes nothing in a lane leaves it as it
    was, so the further sweeps it takes part in change nothing there either.

    A: float32 scratch of LANE_SCRATCH, laid out as the offsets above; L: int32 codes (out).
    """
    nmax = 4
    fnmax = np.float32(nmax)
    flo = -fnmax
    fhi = fnmax - F1
    for j in range(16):
        for i in range(16):
            v = x[16 * j + i]
            A[_XT + 16 * i + j] = v
            A[_W2 + 16 * i + j] = v * v
            A[_W3 + 16 * i + j] = v * v * v
    for j in range(16):
        A[_MX + j] = F0  # the value of largest magnitude (first if tied); |it| in _CIS
        A[_CIS + j] = F0
    for i in range(16):
        for j in range(16):
            v = A[_XT + 16 * i + j]
            gt = abs(v) > A[_CIS + j]
            A[_CIS + j] = abs(v) if gt else A[_CIS + j]
            A[_MX + j] = v if gt else A[_MX + j]
    for j in range(16):
        A[_MX + j] = A[_MX + j] if A[_CIS + j] >= GROUP_MAX_EPS else F0
    for j in range(16):
        A[_CIS + j] = -fnmax / A[_MX + j] if A[_MX + j] != F0 else F0
        A[_SX + j] = F0
        A[_S2 + j] = F0
    for i in range(16):
        o = 16 * i
        for j in range(16):
            fl = min(max(np.rint(A[_CIS + j] * A[_XT + o + j]), flo), fhi)
            A[_LT + o + j] = fl
            A[_SX + j] += A[_W3 + o + j] * fl
            A[_S2 + j] += A[_W2 + o + j] * fl * fl
    for _ in range(5):
        changed = F0
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
                ok = (slx > F0) & (nl != fl) & (nsl2 > F0) & (nslx * nslx * s2 > sx * sx * nsl2)
                A[_LT + o + j] = nl if ok else fl
                A[_SX + j] = nslx if ok else sx
                A[_S2 + j] = nsl2 if ok else s2
                changed += F1 if ok else F0
        if changed == F0:
            break
    for j in range(16):
        if A[_MX + j] == F0:
            fs[j] = F0
            for i in range(16):
                L[16 * j + i] = 0
        else:
            s2 = A[_S2 + j]
            fs[j] = A[_SX + j] / s2 if s2 > F0 else F0
            for i in range(16):
                L[16 * j + i] = int(A[_LT + 16 * i + j]) + nmax

