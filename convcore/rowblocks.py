"""Row blocks: how a reader hands out a tensor it has to compute (dequantize, reorder)
without ever holding a whole float32 copy of it.

A reader says how to make rows ``[a, b)`` of the 2-D view ``(n_rows, row_length)``;
:func:`row_block_loaders` gives the ``load`` and ``chunk_loader`` a :class:`TensorRef`
takes, both working a block of rows at a time under one rule (:data:`BLOCK_ELEMENTS`
values per block, at least one row). The mlx, onnx, npz, gguf and parquet readers use it.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from .model import cast, numpy_dtype

#: a block holds about this many values (8 MB of float32): small beside any tensor worth
#: streaming, large enough that per-block overhead does not show
BLOCK_ELEMENTS = 1 << 21


def block_rows(row_length: int, block_elements: int | None = None) -> int:
    """Rows per block for rows of ``row_length`` values (blocks of ``block_elements``,
    default :data:`BLOCK_ELEMENTS`)."""
    return max(1, (block_elements or BLOCK_ELEMENTS) // max(1, int(row_length)))


def row_block_loaders(shape: tuple[int, ...], rows: Callable[[int, int], np.ndarray], dtype: str = "f32",
                      prepare: Callable[[], object] | None = None, block_elements: int | None = None
                      ) -> tuple[Callable[[], np.ndarray], Callable[[str], Iterator[np.ndarray]]]:
    """``(load, chunk_loader)`` of a tensor of ``shape`` whose rows ``[a, b)`` (of the 2-D
    view: every axis but the last flattened) ``rows(a, b)`` computes, in ``dtype``.

    ``load()`` fills one array of ``shape`` block by block; ``chunk_loader(out)`` yields
    the blocks flattened, cast to ``out``. ``prepare``, when given, is called once at the
    start of each pass (open files, look a scheme up) before the first ``rows`` call.
    ``block_elements`` overrides the block size (tests use small blocks)."""
    n_rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    row_length = int(shape[-1]) if shape else 1
    step = block_rows(row_length, block_elements)

    def blocks() -> Iterator[np.ndarray]:
        if prepare is not None:
            prepare()
        for a in range(0, n_rows, step):
            yield rows(a, min(a + step, n_rows))

    def load() -> np.ndarray:
        out = np.empty((n_rows, row_length), numpy_dtype(dtype))
        row = 0
        for block in blocks():
            out[row:row + len(block)] = block
            row += len(block)
        return out.reshape(shape)

    def pieces(out: str) -> Iterator[np.ndarray]:
        for block in blocks():
            yield cast(block, out).reshape(-1)

    return load, pieces
