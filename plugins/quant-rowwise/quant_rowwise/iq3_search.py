"""llama.cpp's IQ3 search for one sub-block of 32 weights (quantize_row_iq3_xxs_impl and
quantize_row_iq3_s_impl share it): importance weights, signs, the grid search over a
range of trial scales, and the refit of the groups that fell off the grid.

The arithmetic is ggml's float32 arithmetic step by step, without fast-math (the library
is built without FMA contraction or reassociation), so the choices, and the bytes, come
out the same as llama.cpp's.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from . import _cache  # noqa: F401  (the kernel cache, before any @njit here)
from .kquant_bits import nearest

F0 = np.float32(0.0)
F1 = np.float32(1.0)
HALF = np.float32(0.5)
FLT_MAX = np.float32(3.4028234663852886e38)
# IQ3_XXS skips a sub-block whose largest (sign-adjusted) magnitude is below this
EPS_XXS = np.float32(1e-8)


@njit(nogil=True, cache=True)
def best_neighbour(nbr, start, gridq, levels, xval, waux, o, scale, L):
    """The grid row among the candidates at nbr[start] (a length, then rows) closest to
    xval[o:o+4] in waux-weighted squared distance at ``scale``; its levels go to L[o:o+4].
    The first of equal fits wins."""
    best = FLT_MAX
    gi = nbr[start + 1]
    for j in range(start + 1, start + 1 + nbr[start]):
        g = nbr[j]
        d2 = F0
        for i in range(4):
            diff = scale * gridq[g, i] - xval[o + i]
            d2 += waux[o + i] * diff * diff
        if d2 < best:
            best = d2
            gi = g
    for i in range(4):
        L[o + i] = levels[gi, i]
    return gi


@njit(nogil=True, cache=True)
def _code(xval, o, inv):
    """The 12-bit code of the levels nearest xval[o:o+4] * inv, clamped to 0..7."""
    u = 0
    for i in range(4):
        l = nearest(HALF * (inv * xval[o + i] - F1))
        l = min(7, max(0, l))
        u |= l << (3 * i)
    return u


@njit(nogil=True, cache=True)
def _fit(weight, xval, L):
    """sum w x q and sum w q q over the sub-block, q = 2L+1."""
    sumqx = F0
    sumq2 = F0
    for i in range(32):
        w = weight[i]
        q = np.float32(2 * L[i] + 1)
        sumqx += w * xval[i] * q
        sumq2 += w * q * q
    return sumqx, sumq2


@njit(nogil=True, cache=True)
def search32(xb, o, qw, c, has_w, sigma2, xxs, gridq, levels, kmap, nbr,
             weight, waux, xval, L, Laux, on, on_aux, signs):
    """Codes, signs and scale of the 32 weights xb[o:o+32]; returns the scale (>= 0), or
    -1 for a sub-block llama.cpp leaves empty (all magnitudes below its threshold).

    qw[c:c+32] is the importance of these columns when ``has_w``; sigma2 is twice the mean
    square of the 256-weight block. ``xxs`` picks IQ3_XXS's variant (an even number of
    negative signs per 8, 31 trial scales, refit only the off-grid groups) over IQ3_S's
    (free signs, 19 trial scales, refit every group). Scratch, written before it is read:
    weight, waux, xval float32[32] (weights, their square roots, magnitudes); L, Laux
    int32[32] (levels kept and tried); on, on_aux bool[8] (group on the grid); out:
    L, and signs int32[4] (one bit per weight, 7 bits a byte for IQ3_XXS).
    """
    for i in range(32):
        v = xb[o + i]
        if has_w:
            weight[i] = qw[c + i] * np.sqrt(sigma2 + v * v)
        else:
            weight[i] = v * v
    for i in range(32):
        waux[i] = np.sqrt(weight[i])
    for k in range(4):
        s = 0
        nflip = 0
        for i in range(8):
            v = xb[o + 8 * k + i]
            if v >= F0:
                xval[8 * k + i] = v
            else:
                xval[8 * k + i] = -v
                nflip += 1
                s |= 1 << i
        if xxs and nflip % 2:
            # IQ3_XXS stores 7 sign bits a byte, the 8th making the count even: flip the
            # weight whose sign costs least
            imin = 0
            vmin = weight[8 * k] * xb[o + 8 * k] * xb[o + 8 * k]
            for i in range(1, 8):
                v = xb[o + 8 * k + i]
                a = weight[8 * k + i] * v * v
                if a < vmin:
                    vmin = a
                    imin = i
            xval[8 * k + imin] = -xval[8 * k + imin]
            s ^= 1 << imin
        signs[k] = s & 127 if xxs else s
    mx = xval[0]
    for i in range(1, 32):
        if xval[i] > mx:
            mx = xval[i]
    for i in range(32):
        L[i] = 0
    if (mx < EPS_XXS) if xxs else (mx == F0):
        return -1.0
    best = F0
    scale = mx / np.float32(15.0)
    for k in range(8):
        on[k] = xxs
    nstep = 15 if xxs else 9
    for step in range(-nstep, nstep + 1):
        inv = (np.float32(15.0) + np.float32(step) * np.float32(0.2)) / mx
        this_scale = F1 / inv
        for k in range(8):
            u = _code(xval, 4 * k, inv)
            g = kmap[u]
            on_aux[k] = g >= 0
            if g >= 0:
                for i in range(4):
                    Laux[4 * k + i] = levels[g, i]
            else:
                best_neighbour(nbr, -g - 1, gridq, levels, xval, waux, 4 * k, this_scale, Laux)
        sumqx, sumq2 = _fit(weight, xval, Laux)
        if sumq2 > F0 and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            for i in range(32):
                L[i] = Laux[i]
            for k in range(8):
                on[k] = on_aux[k]
    n_off = 0
    for k in range(8):
        if not on[k]:
            n_off += 1
    if n_off > 0 and scale > F0:
        inv = F1 / scale
        for k in range(8):
            if xxs and on[k]:
                continue
            u = _code(xval, 4 * k, inv)
            g = kmap[u]
            if g >= 0:
                for i in range(4):
                    L[4 * k + i] = levels[g, i]
            else:
                best_neighbour(nbr, -g - 1, gridq, levels, xval, waux, 4 * k, scale, L)
        sumqx, sumq2 = _fit(weight, xval, L)
        if sumq2 > F0:
            scale = sumqx / sumq2
    if scale < F0:
        # cannot happen with the magnitudes above; kept as llama.cpp keeps it
        scale = -scale
        for k in range(4):
            signs[k] = (~signs[k]) & (127 if xxs else 255)
    return np.float64(scale)
