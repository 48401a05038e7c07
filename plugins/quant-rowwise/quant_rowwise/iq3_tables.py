"""The lookup tables of the IQ3 kernels, built from the grids in data/iq3_grids.npz at first
use (numpy only; the kernels take them as arguments).

A grid point is four 3-bit levels 0..7; the quantizer works with the odd integers 2l+1
(1..15) and a code ``u = l0 | l1 << 3 | l2 << 6 | l3 << 9`` (4096 codes). For a code that
is not a grid point, the candidates are the grid points at the ``nwant`` smallest squared
distances from it (2 for the 256-point IQ3_XXS grid, 3 for the 512-point IQ3_S grid),
in order of distance then row, as llama.cpp's iq3xs_init_impl lists them: the search
keeps the first of equal fits, so the order is part of the result.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple

import numpy as np

_DATA = Path(__file__).resolve().parent / "data" / "iq3_grids.npz"
# scheme -> (table in the npz, distinct distances a code's candidate list covers)
_GRID = {"iq3_xxs": ("iq3xxs_grid", 2), "iq3_s": ("iq3s_grid", 3)}


class Tables(NamedTuple):
    """What the kernels of one IQ3 type read.

    gridq: float32 (points, 4), each point's values 2l+1 as the search scores them;
    levels: int8 (points, 4), the levels l; values: float32 (points, 4), the values a
    block decodes to (gguf's grid); kmap: int32 (4096,), for each code its grid row, or
    -(1 + offset) of its candidate list in ``neighbours``; neighbours: int32, candidate
    lists, each its length followed by grid rows.
    """

    gridq: np.ndarray
    levels: np.ndarray
    values: np.ndarray
    kmap: np.ndarray
    neighbours: np.ndarray


@functools.cache
def _grids() -> dict[str, np.ndarray]:
    with np.load(_DATA) as npz:
        return {k: npz[k] for k in npz.files}


def _candidates(levels: np.ndarray, nwant: int) -> tuple[np.ndarray, np.ndarray]:
    """kmap and the neighbour lists for the grid of ``levels`` (points, 4)."""
    points = levels.shape[0]
    shifts = 3 * np.arange(4)
    codes = (levels.astype(np.int32) << shifts).sum(axis=1)
    kmap = np.full(4096, -1, np.int32)
    kmap[codes] = np.arange(points, dtype=np.int32)
    off_grid = np.flatnonzero(kmap < 0)
    pos = 2 * ((off_grid[:, None] >> shifts) & 7).astype(np.int32) + 1  # (codes, 4)
    grid = 2 * levels.astype(np.int32) + 1                              # (points, 4)
    d2 = (pos * pos).sum(1)[:, None] + (grid * grid).sum(1)[None, :] - 2 * (pos @ grid.T)
    d2 = d2.astype(np.int16)  # at most 4 * 14**2; a stable int16 sort is a radix sort
    order = np.argsort(d2, axis=1, kind="stable")  # by distance, then row
    d2 = np.take_along_axis(d2, order, axis=1)
    # rank of each entry's distance among its row's distinct distances; keep ranks < nwant
    rank = np.zeros(d2.shape, np.int32)
    np.cumsum(np.diff(d2, axis=1) != 0, axis=1, out=rank[:, 1:])
    keep = rank < nwant  # a prefix of each row
    count = keep.sum(axis=1)
    offsets = np.concatenate(([0], np.cumsum(count + 1)[:-1]))
    neighbours = np.empty(int((count + 1).sum()), np.int32)
    neighbours[offsets] = count
    row, col = np.nonzero(keep)
    neighbours[offsets[row] + 1 + col] = order[row, col]
    kmap[off_grid] = -(1 + offsets)
    return kmap, neighbours


@functools.cache
def tables(name: str) -> Tables:
    """The tables of IQ3 type ``name`` ("iq3_xxs" or "iq3_s"), built once per process."""
    key, nwant = _GRID[name]
    raw = _grids()[key]
    levels = np.searchsorted(np.unique(raw), raw).astype(np.int8)
    kmap, neighbours = _candidates(levels, nwant)
    return Tables(gridq=(2 * levels.astype(np.float32) + 1), levels=levels,
                  values=raw.astype(np.float32), kmap=kmap, neighbours=neighbours)
