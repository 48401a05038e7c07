"""Checking an importance vector (``options["weights"]``) before the kernels see it: one
float32 per column of the rows, finite and not negative. Numpy only, so the scheme
modules can use it without importing numba."""
from __future__ import annotations

from typing import Any

import numpy as np


def importance(weights: Any, n: int, label: str, error: type[Exception] = ValueError) -> np.ndarray:
    """``weights`` as a read-only C-contiguous float32 vector of length ``n``.

    :raises error: naming ``label`` when the shape is not ``(n,)`` or a value is NaN, Inf
        or negative.
    """
    w = np.asarray(weights)
    if w.shape != (n,):
        raise error(f"{label}: expected importance weights of shape ({n},), one per column of "
                    f"the rows, found shape {w.shape}")
    if w.dtype.kind not in "fiu":
        raise error(f"{label}: expected float importance weights, found {w.dtype}")
    w = np.array(w, dtype=np.float32, order="C")  # a copy: the kernels' own
    if not np.isfinite(w).all():
        raise error(f"{label}: importance weights hold NaN or Inf")
    if (w < 0).any():
        raise error(f"{label}: importance weights must not be negative, found {w.min()}")
    w.flags.writeable = False
    return w
