"""The lookup tables of llama.cpp's lattice quantizers on 8-D grids (IQ2 and IQ1 types),
built from a grid's points as ``iq2xs_init_impl`` builds them.

A grid point has eight coordinates, each one of up to four levels (2 bits). A group of
eight weights is rounded level by level to a *code* (level ``l`` of coordinate ``i`` at
bits ``2i``); the code is on the grid or not. ``Tables`` holds

- ``points``: int8 (n, 8), the odd lattice coordinates ``2*l + 1`` of each grid point;
- ``kmap``: int32 (0xAAAB,), the grid index of a code on the grid, or, for a code of
  levels 0..2 off it, ``-(offset + 1)`` where ``neighbours[offset]`` is how many
  neighbours it has and the grid indices of those follow (codes with a level 3 have no
  list, their entry is -1: the quantizers never look them up);
- ``neighbours``: uint16, the lists ``kmap`` points into: the grid points nearest to the
  code (squared distance between odd coordinates), all points of the ``nwant`` smallest
  distances, nearest first and by index within one distance. The quantizers keep the first
  of equally good neighbours, so this order is part of what makes their bytes.

This module is a leaf (numpy only): the grids are data, the tables are derived once per
process by the kernel modules that need them.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

# codes up to 0xAAAA (every level 2), the largest a search forms (ggml allocates 0xAAAC)
KMAP_SIZE = 0xAAAA + 1
_CHUNK = 1024  # off-grid codes whose distances are taken at a time
_FAR = 32767  # beyond any squared distance (at most 8 * 6**2)


class Tables(NamedTuple):
    """A grid's points and neighbour tables (see the module docstring)."""
    points: np.ndarray
    kmap: np.ndarray
    neighbours: np.ndarray


def levels(grid: np.ndarray, coords: tuple[int, ...]) -> np.ndarray:
    """The level (0..3) of each coordinate of each point of a grid stored as ggml's
    uint64 (byte ``i`` = coordinate ``i``): uint8 (n, 8), ``coords[l]`` being the byte of
    level ``l``."""
    raw = np.ascontiguousarray(grid, dtype="<u8").view(np.uint8).reshape(-1, 8)
    lut = np.full(256, 255, np.uint8)
    lut[np.asarray(coords, np.uint8)] = np.arange(len(coords), dtype=np.uint8)
    out = lut[raw]
    if (out == 255).any():
        raise ValueError(f"grid coordinates outside {coords}")
    return out


def build(lv: np.ndarray, nwant: int) -> Tables:
    """The tables of a grid whose points have levels ``lv`` (uint8 (n, 8)), each off-grid
    code listing the points of its ``nwant`` smallest distances."""
    lv = np.asarray(lv, np.int64)
    n = lv.shape[0]
    points = (2 * lv + 1).astype(np.int8)
    shifts = 2 * np.arange(8, dtype=np.int64)
    codes = (lv << shifts).sum(axis=1)
    kmap = np.full(KMAP_SIZE, -1, np.int32)
    kmap[codes] = np.arange(n, dtype=np.int32)
    # lists for the codes of levels 0..2 only: the quantizers clamp their rounding to
    # those (ggml also lists codes with a level 3, which no search looks up)
    ternary = (np.arange(3 ** 8)[:, None] // 3 ** np.arange(8)) % 3
    every = (ternary << shifts).sum(axis=1)
    off = np.sort(every[kmap[every] < 0])
    pos = 2 * ((off[:, None] >> shifts) & 3) + 1  # odd coordinates of each off-grid code
    pts = points.astype(np.int32)
    sq = (pts * pts).sum(1).astype(np.int16)
    parts = []
    sizes = []
    for s in range(0, len(off), _CHUNK):
        p = pos[s:s + _CHUNK].astype(np.int32)
        # squared distances from dot products, a matrix product instead of eight
        # broadcast passes (an integer one: a BLAS call would leave its threads spinning
        # beside the kernels that use these tables)
        dot = (p.astype(np.int16) @ pts.T.astype(np.int16))
        d2 = (sq[None, :] + (p * p).sum(1)[:, None].astype(np.int16)) - 2 * dot
        # the nwant-th smallest distinct distance of each code (or its largest)
        thr = d2.min(axis=1)
        for _ in range(nwant - 1):
            nxt = np.where(d2 > thr[:, None], d2, np.int16(_FAR)).min(axis=1)
            thr = np.where(nxt < _FAR, nxt, thr)
        rows, cols = np.nonzero(d2 <= thr[:, None])
        order = np.lexsort((cols, d2[rows, cols], rows))  # by code, distance, index
        counts = np.bincount(rows, minlength=len(p))
        # each code's list is its count, then its neighbours: entry k of the sorted
        # pairs, of code r, lands after r + 1 counts
        out = np.empty(len(rows) + len(p), np.int64)
        out[np.arange(len(rows)) + rows[order] + 1] = cols[order]
        out[np.cumsum(counts + 1) - counts - 1] = counts
        parts.append(out)
        sizes.append(counts + 1)
    sizes = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
    starts = np.cumsum(sizes) - sizes
    kmap[off] = -(starts + 1)
    neighbours = np.concatenate(parts).astype(np.uint16) if parts else np.zeros(0, np.uint16)
    return Tables(points, kmap, neighbours)
