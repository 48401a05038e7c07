"""Tensors stored as several rows (chunks, :mod:`conv_parquet.schema`): each row read as
a tensor of its own slice, and the rows of one tensor checked and put together.

A chunk's row describes its slice of the first axis as a tensor of shape
``(num_params / prod(shape[1:]), *shape[1:])``, so everything that reads and checks a
row (sizes of data, scales and zero points) reads and checks a chunk the same way; what
is left to check is that the chunks of a tensor are all there, once each, in order,
cover its first axis without gaps or overlaps, and agree on dtype and quantization.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from convcore import ConvcoreError


@dataclass(frozen=True)
class Chunk:
    """One row of a chunked tensor: its ``chunk`` value, the reader's Row of its slice,
    and the whole tensor's shape as the row declares it."""

    index: int
    row: Any  # reader.Row
    shape: tuple[int, ...]


def chunk_shape(values: dict[str, list], i: int, shape: tuple[int, ...], where: str
                ) -> tuple[tuple[int, ...], int]:
    """(shape of row ``i``'s slice, where it starts on the first axis) for a chunk row of
    a tensor of ``shape``; a one-line error when its columns do not describe a slice."""
    index, start, count = values["chunk"][i], values["row_start"][i], values["num_params"][i]
    inner = math.prod(shape[1:])
    if not shape or index < 0:
        raise ConvcoreError(f"{where}: chunk {index} of shape {list(shape)}: not a chunk of a tensor")
    if start is None or start < 0:
        raise ConvcoreError(f"{where}: chunk {index} has row_start {start}")
    if count is None or count <= 0 or inner <= 0 or count % inner:
        raise ConvcoreError(f"{where}: chunk {index}: num_params {count} is not a whole number of "
                            f"indices of the first axis of shape {list(shape)}")
    return (count // inner, *shape[1:]), start


def _describe(chunk: Chunk) -> str:
    row = chunk.row
    quant = f" {row.quant} (quant_axis {row.axis}, group_size {row.group})" if row.quant else ""
    return f"{row.dtype}{list(chunk.shape)}{quant}"


def assemble(file_of: Callable[[int], Path], name: str, chunks: list[Chunk]) -> Any:
    """The Row of tensor ``name`` from its chunk rows in file order (``file_of(part)``:
    the file a row is in, for errors): a one-line error naming the file and the tensor
    for a chunk missing, repeated or out of order, a gap or an overlap between chunks,
    or chunks that disagree."""
    def where(chunk: Chunk) -> str:
        return f"{file_of(chunk.row.part)}: tensor {name!r}"

    counts = Counter(c.index for c in chunks)
    for c in chunks:
        if counts[c.index] > 1:
            raise ConvcoreError(f"{where(c)}: chunk {c.index} appears {counts[c.index]} times")
    for a, b in zip(chunks, chunks[1:]):
        if b.index < a.index:
            raise ConvcoreError(f"{where(b)}: chunk {b.index} comes after chunk {a.index} "
                                "(a tensor's chunks must be in order)")
    first, end = chunks[0], 0
    for k, c in enumerate(chunks):
        if c.index != k:
            follows = f"chunk {c.index} follows chunk {k - 1}" if k else f"its first chunk is {c.index}"
            raise ConvcoreError(f"{where(c)}: chunk {k} missing ({follows})")
        if c.shape != first.shape or (c.row.dtype, c.row.quant, c.row.axis, c.row.group) != (
                first.row.dtype, first.row.quant, first.row.axis, first.row.group):
            raise ConvcoreError(f"{where(c)}: chunk {k} is {_describe(c)}, but chunk 0 is {_describe(first)}")
        if c.row.start != end:
            after = f"chunk {k - 1} ends at {end}" if k else "the first must start at 0"
            kind = "overlaps" if c.row.start < end else "leaves a gap"
            raise ConvcoreError(f"{where(c)}: chunk {k} starts at index {c.row.start} of the first "
                                f"axis, but {after} ({kind})")
        end += c.row.shape[0]
    if end != first.shape[0]:
        what = (f"chunk {len(chunks)} or later is missing" if end < first.shape[0]
                else "they cover more than the tensor")
        raise ConvcoreError(f"{where(chunks[-1])}: its {len(chunks)} chunks cover indices [0, {end}) "
                            f"of the first axis of shape {list(first.shape)}: {what}")
    return replace(first.row, shape=first.shape, start=0, chunks=tuple(replace(c.row, chunk=c.index) for c in chunks))
