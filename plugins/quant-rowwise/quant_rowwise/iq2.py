"""GGUF IQ2 types (iq2_xxs 66 B, iq2_xs 74 B, iq2_s 82 B per 256 weights): the kernel
module ``iquants`` imports on first use (see its docstring for the contract).

Quantizing follows llama.cpp's ``quantize_iq2_xxs`` / ``quantize_iq2_xs`` /
``quantize_iq2_s`` step by step in float32 (``iq2_search``, ``iq2_pack``), so the bytes
are ggml's (on x86-64, where libggml is built without FMA contraction; one departure: a
super-scale beyond f16's range, from weights beyond about 1e7, is stored as 65504 where ggml
writes inf). Each group of 8 weights is coded as a point of an 8-D grid (256, 512 or 1024
points with coordinates 8, 25, 43) and 8 (iq2_xxs, iq2_xs: 7 and a parity) sign bits. The
grids are package data (``data/iq2_grids.npz``, made by ``scripts/make_iq2_grids.py``
from ggml-common.h); their neighbour tables are built from them once per process
(``iq_grid``).
"""
from __future__ import annotations

import functools
import threading
from importlib import resources

import numpy as np

from . import iq_grid
from ._input import faulted_empty
from ._qk import QK_K
from ._threads import run_split
from .iquants import IQuantError
from .kquants import _bits_2d

# name -> (kind in the kernels, bytes per block, neighbour distances kept per code)
_TYPES = {"iq2_xxs": (0, 66, 2), "iq2_xs": (1, 74, 2), "iq2_s": (2, 82, 1)}
COORDS = (0x08, 0x19, 0x2B)  # the byte of each coordinate level in ggml's grids
_lock = threading.Lock()


@functools.cache
def _grids() -> dict[str, np.ndarray]:
    with resources.files(__package__).joinpath("data/iq2_grids.npz").open("rb") as f:
        with np.load(f) as z:
            return {k: z[k] for k in z.files}


def _frozen(a: np.ndarray) -> np.ndarray:
    """A read-only view (one array type per kernel argument, and the caller's flags kept)."""
    a = np.ascontiguousarray(a).view()
    a.flags.writeable = False
    return a


@functools.cache
def _tables_cached(name: str) -> iq_grid.Tables:
    t = iq_grid.build(iq_grid.levels(_grids()[name], COORDS), _TYPES[name][2])
    return iq_grid.Tables(*(_frozen(a) for a in t))


def tables(name: str) -> iq_grid.Tables:
    """The grid points and neighbour tables of ``name`` (built on first use, in a tenth of
    a second or so)."""
    with _lock:
        return _tables_cached(name)


@functools.cache
def coords(name: str) -> np.ndarray:
    """float32 (points, 8): the coordinate values of ``name``'s grid, as gguf-py decodes them."""
    values = np.asarray(COORDS, np.float32)
    return _frozen(values[iq_grid.levels(_grids()[name], COORDS)])


def quantize(name: str, array: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """ggml's ``name`` blocks of ``array`` (f32/f16/bf16, rows of 256k values), uint8 of
    shape ``(*array.shape[:-1], row_bytes)``; ``weights`` the importance of each column
    (required by iq2_xxs and iq2_xs, as in llama.cpp).

    :raises IQuantError: on NaN or Inf in ``array``, or a missing importance matrix.
    """
    from . import iq2_pack

    kind, size, _ = _TYPES[name]
    bits, mode, lut = _bits_2d(array, name)
    shape = np.shape(array)
    n = shape[-1]
    nb = n // QK_K
    if weights is None:
        if name != "iq2_s":
            raise IQuantError(f"{name}: needs an importance matrix")
        qw = _frozen(np.zeros(n, np.float32))
    else:
        qw = _frozen(np.array(weights, dtype=np.float32).reshape(n))
    out = faulted_empty((bits.shape[0], nb * size), np.uint8)
    total = bits.shape[0] * nb
    if total:
        t = tables(name)
        bad = run_split(iq2_pack.rows_iq2, (bits, mode, lut, kind, qw, weights is not None,
                                            t.points, t.kmap, t.neighbours, out), total)
        if bad:
            raise IQuantError(f"{name}: NaN or Inf in input ({bad} of {total} blocks)")
    return out.reshape(*shape[:-1], nb * size)


def dequantize(name: str, blocks: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """float32 values of ``name`` blocks (uint8 (rows, row_bytes)) as an array of ``shape``,
    equal to gguf.quants.dequantize."""
    from . import iq2_dequant

    kind = _TYPES[name][0]
    rows = blocks.shape[0]
    n = shape[-1]
    blocks = _frozen(blocks.reshape(rows, -1))
    out = np.empty((rows, n), np.float32)
    total = rows * (n // QK_K)
    if total:
        run_split(iq2_dequant.deq_iq2, (blocks, kind, coords(name), iq2_dequant.KSIGNS, out),
                  total, runs=min(256, max(1, total // 256)))
    return out.reshape(shape)
