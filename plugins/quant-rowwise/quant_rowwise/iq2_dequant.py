"""The IQ2 dequantizers (iq2_xxs, iq2_xs, iq2_s): ggml's blocks to float32 equal to
gguf.quants.dequantize, which computes each value as ``d * (0.5 + scale) * 0.25 *
coordinate * sign`` in float32, in that order (so this does too)."""
from __future__ import annotations

import numpy as np
from numba import njit

from . import _cache  # noqa: F401  (the kernel cache, before any @njit here)
from ._qk import QK_K
from .kquant_bits import get_f16

HALF = np.float32(0.5)
QUARTER = np.float32(0.25)

# the sign bytes of iq2_xxs/iq2_xs: 7 stored bits and their parity as the 8th
KSIGNS = np.array([i | (bin(i).count("1") % 2) << 7 for i in range(128)], np.uint8)


@njit(nogil=True, cache=True)
def _group(y, o, db, coords, g, signs):
    """The 8 values of grid point g with sign bits ``signs`` at scale db into y[o:o+8]."""
    for i in range(8):
        v = db * coords[g, i]
        y[o + i] = -v if (signs >> i) & 1 else v


@njit(nogil=True, cache=True)
def deq_iq2(blocks, kind, coords, ksigns, out, start, end):
    """Blocks start..end-1 (row-major) of type ``kind`` (0 iq2_xxs, 1 iq2_xs, 2 iq2_s) into
    the float32 rows ``out``; ``coords`` float32 (n, 8), the grid's coordinate values."""
    nb = out.shape[1] // QK_K
    ts = blocks.shape[1] // nb
    for blk in range(start, end):
        r = blk // nb
        b = blk - r * nb
        q = blocks[r, b * ts:(b + 1) * ts]
        y = out[r, b * QK_K:(b + 1) * QK_K]
        d = get_f16(q, 0)
        if kind == 0:
            for ib in range(8):
                o = 2 + 8 * ib
                a0 = np.uint32(q[o]) | np.uint32(q[o + 1]) << 8 | np.uint32(q[o + 2]) << 16 \
                    | np.uint32(q[o + 3]) << 24
                a1 = np.uint32(q[o + 4]) | np.uint32(q[o + 5]) << 8 \
                    | np.uint32(q[o + 6]) << 16 | np.uint32(q[o + 7]) << 24
                db = d * (HALF + np.float32(a1 >> 28)) * QUARTER
                for k in range(4):
                    _group(y, 32 * ib + 8 * k, db, coords, (a0 >> (8 * k)) & 255,
                           ksigns[(a1 >> (7 * k)) & 127])
        else:
            so = 66 if kind == 1 else 74
            for j in range(32):
                sc = (q[so + j // 4] >> (4 * ((j // 2) % 2))) & 15
                db = d * (HALF + np.float32(sc)) * QUARTER
                if kind == 1:
                    v = np.int64(q[2 + 2 * j]) | np.int64(q[3 + 2 * j]) << 8
                    _group(y, 8 * j, db, coords, v & 511, ksigns[v >> 9])
                else:
                    g = np.int64(q[2 + j]) | ((np.int64(q[66 + j // 4]) >> (2 * (j % 4))) & 3) << 8
                    _group(y, 8 * j, db, coords, g, q[34 + j])
    return 0
