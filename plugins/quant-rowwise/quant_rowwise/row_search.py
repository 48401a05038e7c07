"""Scale and zero point of an asymmetric per-row code, chosen by least squares.

Min/max scaling spends the code range on the row's two extremes. For weights (bell-shaped
rows) a narrower window, clipping a few outliers, gives a smaller total squared error, and
more so the fewer bits there are. Per row:

1. try min/max's own grid and ``N_WINDOWS[bits]`` windows centred on the row's midrange,
   from ``F_LO[bits]`` of the row's range up to all of it; quantize into each and fit
   ``x ~ a*q + m`` by least squares (closed form from five sums, so each window costs
   one pass); starting from min/max's grid means no row ends worse than min/max;
2. keep the window whose fitted line has the least squared error, then alternate
   (requantize with ``a, m``; refit) ``LLOYD_ROUNDS[bits]`` times while the error drops.

The result is stored in the seed layout: ``scale = a``, ``zero_point = -m / a`` (a float),
so ``(q - zero_point) * scale`` still dequantizes it and no reader changes.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import _cache  # noqa: F401  (the kernel cache, before any @njit here)

# narrowest window tried, as a fraction of the row's range: few levels want clipping;
# how many windows and refinement rounds: with many levels the error is flat near the
# full range, so 8-bit rows get a short search (their gain is a few percent at most)
F_LO = {1: 0.2, 2: 0.3, 4: 0.55, 8: 0.9}
N_WINDOWS = {1: 16, 2: 16, 4: 12, 8: 3}
LLOYD_ROUNDS = {1: 3, 2: 3, 4: 3, 8: 1}


#: the sums may be reassociated (LLVM then vectorizes them): 2.4x faster at 8 bits and 3x
#: at 4, and on gaussian rows the same codes bit for bit (a row's sums are one thread's,
#: so a machine gives the same bytes every run)
FAST = {"reassoc", "nsz", "contract"}


@njit(nogil=True, cache=True, inline="always", fastmath=FAST)
def _fit(x, lo, step, qmax, sx, sxx):
    """Codes of ``x`` on the grid ``lo + step*q``, then the least-squares line
    ``x ~ a*q + m`` through them: (a, m, squared error); a <= 0 when the codes are all
    equal (no line to fit)."""
    n = x.shape[0]
    inv = 1.0 / step
    sq = 0.0
    sqq = 0.0
    sqx = 0.0
    for j in range(n):
        q = min(max(np.rint((x[j] - lo) * inv), 0.0), qmax)
        xj = np.float64(x[j])
        sq += q
        sqq += q * q
        sqx += q * xj
    den = n * sqq - sq * sq
    if den <= 0.0:
        return -1.0, 0.0, np.inf
    a = (n * sqx - sq * sx) / den
    m = (sx - a * sq) / n
    err = sxx - 2.0 * a * sqx - 2.0 * m * sx + a * a * sqq + 2.0 * a * m * sq + n * m * m
    return a, m, err


@njit(nogil=True, cache=True, parallel=True, fastmath=FAST)
def asym_mse(x, qmax, f_lo, n_windows, rounds, codes, scales, zps, bad):
    """Least-squares asymmetric codes for each row of ``x`` (float32 rows).

    ``codes`` (uint8, x's shape), ``scales`` and ``zps`` (float32, one per row) are
    written; ``bad[0]`` is set when a row holds NaN or Inf."""
    for r in prange(x.shape[0]):
        row = x[r]
        n = row.shape[0]
        lo = row[0]
        hi = row[0]
        sx = 0.0
        sxx = 0.0
        nonfinite = False  # stored after the loop: a store inside would make LLVM guard
        for j in range(n):  # the vector loop with run-time overlap checks
            v = row[j]
            nonfinite |= v - v != np.float32(0.0)
            lo = min(lo, v)
            hi = max(hi, v)
            sx += np.float64(v)
            sxx += np.float64(v) * np.float64(v)
        if nonfinite:
            bad[0] = 1
        span = np.float64(hi) - np.float64(lo)
        if not span > 0.0:  # constant row (or NaN): exact with one code
            for j in range(n):
                codes[r, j] = 0
            scales[r] = np.float32(1.0)
            zps[r] = -lo
            continue
        mid = 0.5 * (np.float64(hi) + np.float64(lo))
        # start from min/max's own grid (integer zero point), so no row ends worse
        best_a = span / qmax
        zp = min(max(np.rint(-np.float64(lo) / best_a), 0.0), qmax)
        best_a, best_m, best_err = _fit(row, -zp * best_a, best_a, qmax, sx, sxx)
        if not best_a > 0.0:
            best_a, best_m, best_err = span / qmax, np.float64(lo), np.inf
        for w in range(n_windows):
            f = f_lo + (1.0 - f_lo) * w / max(n_windows - 1, 1)
            a, m, err = _fit(row, mid - 0.5 * f * span, f * span / qmax, qmax, sx, sxx)
            if a > 0.0 and err < best_err:
                best_a, best_m, best_err = a, m, err
        for _ in range(rounds):
            a, m, err = _fit(row, best_m, best_a, qmax, sx, sxx)
            if not (a > 0.0 and err < best_err):
                break
            best_a, best_m, best_err = a, m, err
        for j in range(n):
            codes[r, j] = np.uint8(min(max(np.rint((row[j] - best_m) / best_a), 0.0), qmax))
        scales[r] = np.float32(best_a)
        zps[r] = np.float32(-best_m / best_a)
