"""The searches of llama.cpp's IQ2 quantizers (iq2_xxs, iq2_xs, iq2_s) for a sub-block of
groups of eight weights on an 8-D grid: sign folding, ``make_qp_quants`` (iq2_xxs's
starting scale) and the scale search, which codes each group as a grid point (its rounded
code, or the best neighbour of a code off the grid).

They follow ggml-quants.c's float32 arithmetic operation by operation, with no fast-math
flags: the sums are sequential, as C compiles them, so the bytes come out as ggml's.

Arguments shared by the functions: ``points``, ``kmap``, ``nbrs`` are a grid's
``iq_grid.Tables``; ``xval`` the magnitudes of a sub-block's weights after sign folding;
``weight`` their importance and ``waux`` its square root (what the neighbour search
weights distances with); ``L`` / ``Laux`` int32 levels (0..2) of the chosen and the tried
codes.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from . import _cache  # noqa: F401  (the kernel cache, before any @njit here)
from .kquant_bits import nearest, rint_clamp

F0 = np.float32(0.0)
F1 = np.float32(1.0)
HALF = np.float32(0.5)
TENTH = np.float32(0.1)
FIVE = np.float32(5.0)  # 2 * kMaxQ - 1: the largest odd grid coordinate
FLT_MAX = np.float32(3.4028234663852886e38)


@njit(nogil=True, cache=True)
def split_signs(xb, b0, ngroups, fold, weight, xval, sg):
    """The magnitudes of the weights xb[b0:b0+8*ngroups] into xval, the sign bits of each
    group of 8 into sg.

    With ``fold`` (iq2_xxs, iq2_xs), a group with an odd count of negative weights gives
    the one of least weight * x**2 the wrong sign (its xval is negated, its bit flipped),
    so the count is even and the 8th bit, the parity of the other 7, is not stored: sg
    holds 7 bits. Without (iq2_s), all 8.
    """
    for k in range(ngroups):
        x0 = 8 * k
        nflip = 0
        s = 0
        for i in range(8):
            v = xb[b0 + x0 + i]
            if v >= F0:
                xval[x0 + i] = v
            else:
                xval[x0 + i] = -v
                nflip += 1
                s |= 1 << i
        if fold and nflip % 2:
            imin = 0
            mn = weight[x0] * xb[b0 + x0] * xb[b0 + x0]
            for i in range(1, 8):
                v = xb[b0 + x0 + i]
                ax = weight[x0 + i] * v * v
                if ax < mn:
                    mn = ax
                    imin = i
            xval[x0 + imin] = -xval[x0 + imin]
            s ^= 1 << imin
        sg[k] = s & 127 if fold else s


@njit(nogil=True, cache=True)
def qp_scale(n, nmax, x, w, L):
    """llama.cpp's make_qp_quants: the scale of x[0:n] on levels 0..nmax under weights w,
    searched around nmax / max(x) and refined level by level; levels into L.

    As in C, the levels are kept as uint8: a negative one (x holds one negated magnitude
    per odd sign count) wraps to 256 - l in L, which later steps read back as such.
    """
    mx = F0
    for i in range(n):
        if not mx > x[i]:
            mx = x[i]
    if mx < np.float32(1e-15):
        for i in range(n):
            L[i] = 0
        return F0
    fmax = np.float32(nmax)
    iscale = fmax / mx
    for i in range(n):
        L[i] = nearest(iscale * x[i]) & 255
    scale = F1 / iscale
    best = F0
    for i in range(n):
        diff = x[i] - scale * np.float32(L[i])
        best += w[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (TENTH * np.float32(step) + fmax) / mx
        scale_is = F1 / iscale_is
        mse = F0
        for i in range(n):
            lv = min(nmax, nearest(iscale_is * x[i]))
            diff = x[i] - scale_is * np.float32(lv)
            mse += w[i] * diff * diff
        if mse < best:
            best = mse
            iscale = iscale_is
    sumlx = F0
    suml2 = F0
    for i in range(n):
        lv = min(nmax, nearest(iscale * x[i]))
        L[i] = lv & 255
        fl = np.float32(lv)
        sumlx += w[i] * x[i] * fl
        suml2 += w[i] * fl * fl
    for _ in range(5):
        changed = 0
        for i in range(n):
            wi = w[i]
            fl = np.float32(L[i])
            slx = sumlx - wi * x[i] * fl
            sl2 = suml2 - wi * fl * fl
            if slx > F0 and sl2 > F0:
                new_l = min(nmax, nearest(x[i] * sl2 / slx))
                if new_l != L[i]:
                    fn = np.float32(new_l)
                    slx += wi * x[i] * fn
                    sl2 += wi * fn * fn
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 255
                        sumlx = slx
                        suml2 = sl2
                        changed += 1
        if changed == 0:
            break
    return sumlx / suml2 if suml2 > F0 else F0


@njit(nogil=True, cache=True)
def search(ngroups, xval, weight, waux, base, scale, half, refit_all, points, kmap, nbrs, L,
           Laux):
    """The scale search of one sub-block of ``ngroups`` groups of 8; levels into L, the
    scale returned.

    Candidates: the inverse scales (5 + step / 10) / base for step in -half..half, each
    group rounded to its code or, off the grid, its best neighbour at that scale; the one
    of largest sumqx**2 / sumq2 wins (``scale`` stands when none does). Then the groups
    the winner had off the grid (``refit_all``: every group, iq2_xxs's way) are coded
    again at its scale and the scale is refit. One loop serves both stages (the last turn
    is the refit), and nothing is called in it: array arguments of a Numba call cost
    reference counting, which dominated when the groups were coded by a helper.
    """
    n = 8 * ngroups
    everyone = (1 << ngroups) - 1
    best = F0
    off = 0  # bit k: group k of the best candidate was off the grid
    for i in range(n):
        L[i] = 0
    last = 2 * half + 1
    for turn in range(last + 1):
        if turn < last:
            inv = (FIVE + np.float32(turn - half) * TENTH) / base
            at = F1 / inv
            dst = Laux
            todo = everyone
        else:
            todo = everyone if refit_all else off
            if todo == 0 or not scale > F0:
                break
            inv = F1 / scale
            at = scale
            dst = L
        off_now = 0
        for k in range(ngroups):
            if not (todo >> k) & 1:
                continue
            x0 = 8 * k
            u = 0
            for i in range(8):
                lv = rint_clamp(HALF * (inv * xval[x0 + i] - F1), 0, 2)
                dst[x0 + i] = lv
                u |= lv << (2 * i)
            m = kmap[u]
            if m >= 0:
                continue
            # off the grid: the nearest of its listed neighbours, under the weights waux
            # (the first of equals, as C's strict <)
            off_now |= 1 << k
            o = -m - 1
            dbest = FLT_MAX
            gi = np.int64(nbrs[o + 1])
            for j in range(1, np.int64(nbrs[o]) + 1):
                g = np.int64(nbrs[o + j])
                d2 = F0
                for i in range(8):
                    diff = at * np.float32(points[g, i]) - xval[x0 + i]
                    d2 += waux[x0 + i] * diff * diff
                if d2 < dbest:
                    dbest = d2
                    gi = g
            for i in range(8):
                dst[x0 + i] = (points[gi, i] - 1) // 2
        sumqx = F0
        sumq2 = F0
        for i in range(n):
            w = weight[i]
            q = np.float32(2 * dst[i] + 1)
            sumqx += w * xval[i] * q
            sumq2 += w * q * q
        if turn == last:
            if sumq2 > F0:
                scale = sumqx / sumq2
        elif sumq2 > F0 and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            for i in range(n):
                L[i] = Laux[i]
            off = off_now
    return scale
