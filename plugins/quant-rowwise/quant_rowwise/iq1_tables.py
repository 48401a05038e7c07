"""The tables of the IQ1_S / IQ1_M kernels: the 2048-point grid (package data) and, built
on first use, the map from a group's ternary codes to its grid point or to the list of
grid points near it (what llama.cpp's ``iq2xs_init_impl`` builds for these two types).

A group of 8 values has codes 0, 1, 2 (for -1, 0, +1) packed two bits each into a key
``u = sum(code[j] << 2*j)``. ``kmap[u]`` is the grid point with those codes, or, for a
code pattern off the grid, ``-(1 + o)``: ``nbrs[o]`` is the number of neighbours and
``nbrs[o+1:o+1+count]`` are they, nearest first.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

GRID_FILE = Path(__file__).resolve().parent / "data" / "iq1_grids.npz"
# one past the largest key of codes 0..2 (0xAAAA)
KMAP_SIZE = 0xAAAB
# neighbours are the grid points at the three smallest distances from an off-grid pattern
NEAREST_LEVELS = 3


@functools.cache
def grid() -> np.ndarray:
    """iq1s_grid: int8 (2048, 8), each grid point's values -1, 0, +1."""
    with np.load(GRID_FILE) as data:
        g = np.ascontiguousarray(data["iq1s_grid"], dtype=np.int8)
    if g.shape != (2048, 8):
        raise RuntimeError(f"{GRID_FILE}: iq1s_grid has shape {g.shape}, expected (2048, 8)")
    return g


def neighbour_lists(points: np.ndarray, queries: np.ndarray,
                    levels: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``queries`` (codes 0..7), the indices of the rows of ``points``
    whose squared distance to it is one of its ``levels`` smallest distances, ordered by
    (distance, index): the neighbour lists of llama.cpp's grid searches. Returned as
    (starts, indices): query i's list is ``indices[starts[i]:starts[i+1]]``."""
    p = points.astype(np.float32)
    q = queries.astype(np.float32)
    # |q - p|^2 = |q|^2 + |p|^2 - 2 q.p, exact in float32 for small codes, as one BLAS
    # product and in-place passes (an integer product or per-column passes take 10x longer)
    d = q @ p.T
    d *= -2.0
    d += (q * q).sum(1)[:, None]
    d += (p * p).sum(1)[None, :]
    d2 = d.astype(np.uint8)
    cut = d2.min(1)
    for _ in range(levels - 1):
        cut = np.where(d2 > cut[:, None], d2, np.uint8(255)).min(1)
    rows, cols = np.nonzero(d2 <= cut[:, None])  # row-major: by row, then index
    order = np.lexsort((d2[rows, cols], rows))  # stable: equal distances keep index order
    starts = np.searchsorted(rows, np.arange(len(q) + 1))
    return starts, cols[order].astype(np.int32)


def _key(codes: np.ndarray) -> np.ndarray:
    return (codes.astype(np.int32) << (2 * np.arange(8, dtype=np.int32))).sum(-1)


@functools.cache
def tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid int8 (2048, 8), kmap int32 (KMAP_SIZE,), nbrs int32) as described above."""
    g = grid()
    codes = (g + 1).astype(np.int32)
    kmap = np.full(KMAP_SIZE, -1, np.int32)
    kmap[_key(codes)] = np.arange(len(g), dtype=np.int32)
    # every pattern of 8 ternary codes (only these occur); the off-grid ones get lists
    every = (np.arange(3 ** 8)[:, None] // 3 ** np.arange(8)) % 3
    keys = _key(every)
    off = kmap[keys] < 0
    starts, flat = neighbour_lists(codes, every[off], NEAREST_LEVELS)
    sizes = np.diff(starts)
    # each list is preceded by its length: list i moves up by i + 1 slots
    offsets = starts[:-1] + np.arange(len(sizes))
    nbrs = np.empty(len(flat) + len(sizes), np.int32)
    nbrs[offsets] = sizes
    nbrs[np.repeat(offsets + 1 - starts[:-1], sizes) + np.arange(len(flat))] = flat
    kmap[keys[off]] = -(1 + offsets).astype(np.int32)
    return g, kmap, nbrs
