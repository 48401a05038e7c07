"""GGUF IQ4_NL (blocks of 32, 18 bytes) and IQ4_XS (super-blocks of 256, 136 bytes): the
entry points ``iquants.py`` calls.

Blocks are llama-quantize's (``quantize_iq4_nl`` / ``quantize_iq4_xs``, with or without
an importance matrix) byte for byte but for float32 scales too large for f16: ggml writes
an infinite scale, these kernels the largest finite f16. The kernels are in
``iq4_pack``; input is read as raw bits (f32, f16 or bf16) and widened one block at a
time inside them, so a tensor is never copied to f32. Rows run on threads
(``_threads.run_split``).
"""
from __future__ import annotations

import numpy as np

import convcore

from ._input import faulted_empty
from .iquants import IQ_TYPES, IQuantError
from .kquants import _F16_LUT, _NO_LUT

_MODE = {"f32": 0, "f16": 1, "bf16": 2}
_NO_WEIGHTS = np.zeros(1, np.float32)


def _bits_rows(array: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """A read-only 2-D uint16 view of the raw bits of ``array`` (no f32 copy), the widening
    mode (0 f32, two uint16 per value; 1 f16, through the table; 2 bf16) and its table."""
    arr = np.ascontiguousarray(array)
    kind = convcore.dtype_name(arr.dtype)
    bits = arr.reshape(-1, arr.shape[-1]).view(np.uint16)  # a new view: marking it leaves ``array`` be
    bits.flags.writeable = False
    return bits, _MODE[kind], _F16_LUT if kind == "f16" else _NO_LUT


def quantize(name: str, array: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """``name`` blocks (uint8, shape ``(*array.shape[:-1], row_bytes)``) of ``array`` (f32,
    f16 or bf16, rows a whole number of blocks, as iquants checks), with ``weights`` (the
    float32 importance of each column) or without.

    :raises IQuantError: when the input holds NaN or Inf.
    """
    from . import iq4_pack
    from ._threads import run_split

    block, size, _ = IQ_TYPES[name]
    shape = np.shape(array)
    bits, mode, lut = _bits_rows(array)
    nb = shape[-1] // block
    out = faulted_empty((bits.shape[0], nb * size), np.uint8)
    total = bits.shape[0] * nb
    qw = _NO_WEIGHTS if weights is None else np.ascontiguousarray(weights, np.float32)
    # a run of iq4_nl blocks is one eighth of the work of as many iq4_xs ones
    runs = 256 if block == 256 else max(1, min(256, total // 64))
    bad = run_split(iq4_pack.rows_iq4, (bits, mode, lut, qw, weights is not None, block, out),
                    total, runs=runs)
    if bad:
        raise IQuantError(f"{name}: NaN or Inf in input ({bad} of {total} blocks)")
    return out.reshape(*shape[:-1], nb * size)


def dequantize(name: str, blocks: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 values of ``name`` blocks (uint8 rows, as iquants passes them) as an
    array of ``shape``, equal to gguf.quants.dequantize bit for bit."""
    from . import iq4_pack
    from ._threads import run_split

    block = IQ_TYPES[name][0]
    rows, n = blocks.shape[0], shape[-1]
    out = np.empty((rows, n), np.float32)
    total = rows * (n // block)
    kernel = iq4_pack.deq_iq4_nl if block == 32 else iq4_pack.deq_iq4_xs
    blocks = np.ascontiguousarray(blocks, np.uint8).reshape(rows, -1)
    blocks.flags.writeable = False  # a new view: one kernel type, whatever the caller's array
    # runs of at least 2048 blocks: smaller ones spend more on dispatch than on decoding
    run_split(kernel, (blocks, _F16_LUT, out), total, runs=min(256, max(1, total // 2048)))
    return out.reshape(shape)
