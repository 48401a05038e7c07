"""Pieces shared by the IQ1_S and IQ1_M block kernels (iq1_s.py, iq1_m.py): the shifted
ternary values, the ordering of a group's values, the step from a group's codes to a grid
point, and the scale refit over chosen grid points.

The kernels reproduce llama.cpp's ``quantize_row_iq1_{s,m}_impl`` in float32, each sum in
the source's order and without fast-math, so most blocks come out byte for byte as
ggml writes them (the tests count how many).

A group's codes are 0, 1, 2 for the values -1, 0, +1; the value stored for code c is
``QV[shift][c]``, the ternary value moved by -DELTA (shift 0) or +DELTA (shift 1).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from . import _cache  # noqa: F401  (the kernel cache, before any @njit here)

F0 = np.float32(0.0)
F1 = np.float32(1.0)
FLT_MAX = np.float32(3.4028234663852886e38)
DELTA = np.float32(0.125)  # IQ1S_DELTA, IQ1M_DELTA
# QV[0]: the values minus DELTA (ggml's x_m), QV[1]: plus DELTA (x_p)
QV = np.array([[-1.0, 0.0, 1.0]], np.float32) + np.array([[-DELTA], [DELTA]], np.float32)


@njit(nogil=True, cache=True)
def sort_order(xb, o, n, idx):
    """idx[0:n] = the positions 0..n-1 of xb[o:o+n] in ascending order of value, equal
    values in position order (a stable sort: what glibc's qsort, a merge sort for arrays
    this small, gives ggml)."""
    for j in range(n):
        idx[j] = j
    for j in range(1, n):
        v = idx[j]
        xv = xb[o + v]
        k = j
        while k > 0 and xb[o + idx[k - 1]] > xv:
            idx[k] = idx[k - 1]
            k -= 1
        idx[k] = v


@njit(nogil=True, cache=True)
def group_key(L, o):
    """The 16-bit key of the 8 codes at L[o:o+8] (two bits each, first code lowest)."""
    u = 0
    for j in range(8):
        u |= L[o + j] << (2 * j)
    return u


@njit(nogil=True, cache=True)
def best_neighbour(nbrs, start, codes, xb, o, weight, wo, scale, qv, terms):
    """The grid point among the list at nbrs[start] (its length, then the points) whose
    values ``qv[code]`` times ``scale`` come nearest xb[o:o+8] in weighted squared
    distance (weights weight[wo:wo+8]); the first such point on ties: ggml's
    iq1_find_best_neighbour2. -1 when no distance is finite (ggml would stop there).

    Each point's distance is a sum over its 8 values of w * diff * diff, added in
    value order; the 24 possible terms (value i, code c) are made once into
    terms[3*i + c], so a point costs 8 lookups and adds, with the same sums as ggml's."""
    for i in range(8):
        w = weight[wo + i]
        for c in range(3):
            diff = scale * qv[c] - xb[o + i]
            terms[3 * i + c] = w * diff * diff
    best = FLT_MAX
    found = -1
    for m in range(1, nbrs[start] + 1):
        g = nbrs[start + m]
        d2 = terms[codes[g, 0]]
        for i in range(1, 8):
            d2 += terms[3 * i + codes[g, i]]
        if d2 < best:
            best = d2
            found = g
    return found


@njit(nogil=True, cache=True)
def grid_point(L, lo, codes, kmap, nbrs, xb, o, weight, wo, scale, qv, terms):
    """The grid point for the 8 codes at L[lo:lo+8]: the point with those codes, or, off
    the grid, the best of their neighbours (the codes are then rewritten to that
    point's). Returns (point, whether the codes were on the grid). terms: float32[24]
    scratch for best_neighbour."""
    g = kmap[group_key(L, lo)]
    if g >= 0:
        return g, True
    start = -g - 1
    g = best_neighbour(nbrs, start, codes, xb, o, weight, wo, scale, qv, terms)
    if g < 0:  # only for non-finite weights: keep the list's first (a nearest) point
        g = nbrs[start + 1]
    for i in range(8):
        L[lo + i] = codes[g, i]
    return g, False
