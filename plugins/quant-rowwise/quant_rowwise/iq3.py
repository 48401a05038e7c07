"""GGUF IQ3_XXS (256 weights in 98 bytes) and IQ3_S (256 in 110 bytes): the kernel entry
points that ``iquants`` calls.

The quantizer is llama.cpp's (``quantize_iq3_xxs`` / ``quantize_iq3_s``): per 32 weights,
magnitudes are matched to points of a grid of four 3-bit levels (256 points for IQ3_XXS,
512 for IQ3_S) at 31 or 19 trial scales, codes off the grid replaced by their best
neighbour, the best weighted least-squares fit kept and its off-grid groups refitted;
the weights are the importance vector times sqrt(2 mean square + x^2), or x^2 without
one. Its float32 arithmetic is reproduced step by step, so the blocks equal ggml's. One
deliberate difference: in an IQ3_S block with an all-zero sub-block followed by others,
llama.cpp writes the later sub-blocks' grid rows and signs into the wrong slots (it does
not advance its pointers past the empty one); here every sub-block lands in its own.

Input is read as raw bits (kquants' widening of f32/f16/bf16), a block at a time, so no
float32 copy of the tensor is made. The kernels: ``iq3_tables`` (grids and neighbour
lists, numpy), ``iq3_search`` (one sub-block), ``iq3_pack`` (blocks and the row driver),
``iq3_dequant``.
"""
from __future__ import annotations

import numpy as np

from ._input import faulted_empty
from ._qk import QK_K
from .iq3_tables import tables

TYPE_SIZE = {"iq3_xxs": 98, "iq3_s": 110}
_NO_WEIGHTS = np.zeros(1, np.float32)


def quantize(name: str, array: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """``name`` blocks (uint8, shape ``(*array.shape[:-1], row_bytes)``) of the f32/f16/bf16
    ``array`` (rows of 256k values), ``weights`` the float32 importance of each column or
    None. :raises iquants.IQuantError: on NaN or Inf in ``array``."""
    from . import iq3_pack
    from ._threads import run_split
    from .iquants import IQuantError
    from .kquants import _bits_2d

    bits, mode, lut = _bits_2d(array, name)
    shape = np.shape(array)
    nb = shape[-1] // QK_K
    out = faulted_empty((bits.shape[0], nb * TYPE_SIZE[name]), np.uint8)
    total = bits.shape[0] * nb
    if total:
        t = tables(name)
        has_w = weights is not None
        # a fresh writable copy: a read-only one would be another kernel signature
        qw = np.array(weights, dtype=np.float32) if has_w else _NO_WEIGHTS
        args = (bits, mode, lut, qw, has_w, name == "iq3_xxs", t.gridq, t.levels, t.kmap,
                t.neighbours, out)
        bad = run_split(iq3_pack.rows_iq3, args, total)
        if bad:
            raise IQuantError(f"{name}: NaN or Inf in input ({bad} of {total} blocks)")
    return out.reshape(*shape[:-1], nb * TYPE_SIZE[name])


def dequantize(name: str, blocks: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """float32 values of shape ``shape`` from the uint8 rows ``blocks`` (one row of blocks
    per row of values), equal to gguf.quants.dequantize's."""
    from . import iq3_dequant
    from ._threads import run_split

    rows = blocks.shape[0]
    nb = shape[-1] // QK_K
    blocks = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(rows, nb * TYPE_SIZE[name])
    blocks.flags.writeable = False  # one kernel type, whatever the caller's array
    out = np.empty((rows, shape[-1]), np.float32)
    if rows and nb:
        run_split(iq3_dequant.deq_iq3, (blocks, name == "iq3_xxs", tables(name).values, out),
                  rows * nb, runs=min(256, max(1, rows * nb // 256)))
    return out.reshape(shape)
