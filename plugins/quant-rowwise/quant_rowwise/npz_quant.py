"""The npz writer's quantization, a block of rows at a time.

A 2-D tensor is quantized :data:`WRITE_BLOCK_ELEMENTS` values at a time: the per-row
schemes (``int{1,2,4,8}-row``, ``int8-row-sym``) compute each row on its own, so a block
of rows gives the codes, scales and zero points the whole tensor gives, bit for bit.
``int8-tensor`` has one scale for the whole tensor: a first pass over the blocks finds
the tensor's largest magnitude, handed to each block's quantize as ``absmax`` (the
scale is that over 127, as the whole-tensor kernel computes it), a second makes the
codes with it. The codes go into their member as they
are made (:func:`npz_members.member_writer`); scales and zero points (4 bytes a row) are
kept and written after. The relative error of the manifest is summed over the same
blocks of :data:`ERROR_ROWS_ELEMENTS` as over the whole tensor, in the same order, so
its value does not depend on the write blocks.

The rows come from a file map when the source reader hands out one (pages already read
leave the resident set: ``page_releaser``), else from the reader's own pieces (a
quantized source dequantized a block at a time), gathered into row blocks.
"""
from __future__ import annotations

import zipfile
from contextlib import ExitStack
from typing import Any, Iterator

import numpy as np

import convcore
from convcore import ConvcoreError, TensorRef

from .npz_members import member_writer, write_member

#: values quantized at a time (16 MB of float32): rounded to whole blocks of the error sums
WRITE_BLOCK_ELEMENTS = 1 << 22
#: values per block of the relative-error sums (float64 sums of float32 blocks)
ERROR_ROWS_ELEMENTS = 1 << 21


class ErrorSums:
    """||x - dequant(x)||² and ||x||² summed a block of :data:`ERROR_ROWS_ELEMENTS`
    values (whole rows) at a time; rows must be added in order, each call starting on a
    block boundary."""

    def __init__(self, scheme: str, width: int):
        self.spec = convcore.get_registry().scheme(scheme)
        self.width = width
        self.step = max(1, ERROR_ROWS_ELEMENTS // max(1, width))
        self.diff2 = self.norm2 = 0.0

    def add(self, x: np.ndarray, data: dict[str, np.ndarray]) -> None:
        """Rows ``x`` (2-D) and their codes ``data`` (arrays of one entry a row, or of the
        whole tensor: int8-tensor's scale)."""
        rows = x.shape[0]
        release = convcore.page_releaser(x)
        for a in range(0, rows, self.step):
            b = min(a + self.step, rows)
            part = {k: (v[a:b] if v.ndim and v.shape[0] == rows else v) for k, v in data.items()}
            xs = np.asarray(convcore.cast(x[a:b], "f32"), np.float32).reshape(-1)
            d = xs - np.asarray(self.spec.dequantize(part, (b - a, self.width)), np.float32).reshape(-1)
            self.diff2 += float(np.dot(d, d))
            self.norm2 += float(np.dot(xs, xs))
            release(x[a:b])

    def value(self) -> float:
        diff, norm = self.diff2 ** 0.5, self.norm2 ** 0.5
        return diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))


def relative_error_rows(x: np.ndarray, scheme: str, data: dict[str, np.ndarray]) -> float:
    """||x - dequant(x)|| / ||x|| of ``x`` (2-D) and its per-row codes ``data`` dequantized
    by ``scheme``, a block of rows at a time: no whole-tensor float32 copies (three of them
    took 786 MB for the 1.1B model's embedding)."""
    sums = ErrorSums(scheme, x.shape[1])
    sums.add(x, data)
    return sums.value()


def block_rows(width: int) -> int:
    """Rows quantized at a time: whole blocks of the error sums, about
    :data:`WRITE_BLOCK_ELEMENTS` values."""
    step = max(1, ERROR_ROWS_ELEMENTS // max(1, width))
    return step * max(1, WRITE_BLOCK_ELEMENTS // (step * max(1, width)))


def row_blocks(ref: TensorRef, step: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows) of the 2-D tensor ``ref``, ``step`` rows at a time: views of what
    ``ref.load()`` gives (a file map: nothing read yet), or, for a reader that makes the
    tensor (a ``chunk_loader``), its float32 pieces gathered into one reused buffer (each
    block is consumed before the next is made)."""
    rows, width = ref.shape
    if ref.chunk_loader is None or ref.dtype not in ("f32", "f16", "bf16"):
        array = ref.load()
        for a in range(0, rows, step):
            yield a, array[a:a + step]
        return
    buffer = np.empty(min(step, rows) * width, np.float32)
    a = filled = 0
    for piece in ref.load_chunks("f32"):
        pos = 0
        while pos < piece.size:
            if a >= rows:
                raise ConvcoreError(f"{ref.source or ref.name}: tensor {ref.name!r} read as more than "
                                    f"{rows * width} values, expected {rows * width} for shape {list(ref.shape)}")
            cap = min(step, rows - a) * width
            take = min(piece.size - pos, cap - filled)
            buffer[filled:filled + take] = piece[pos:pos + take]
            filled += take
            pos += take
            if filled == cap:
                yield a, buffer[:cap].reshape(-1, width)
                a += cap // width
                filled = 0


def _largest_magnitude(ref: TensorRef, step: int) -> float:
    """int8-tensor's first pass: the tensor's largest |x| (its one scale is that over 127),
    found a block of rows at a time."""
    from . import rows as kernels
    from ._input import f32_slices

    largest = np.float32(0)
    for _, x in row_blocks(ref, step):
        _check_input(ref, x, "int8-tensor")
        amax = np.empty(x.shape[0], np.float32)
        for start, part in f32_slices(np.ascontiguousarray(x)):
            kernels._absmax_rows(part, amax[start:start + len(part)])
        if not np.isfinite(amax).all():
            raise ConvcoreError(f"tensor {ref.name!r}: int8-tensor: NaN or Inf in input")
        if amax.size:
            largest = max(largest, amax.max())
    return float(largest)


def _check_input(ref: TensorRef, x: np.ndarray, scheme: str) -> None:
    dtype = convcore.dtype_name(x.dtype)
    if dtype not in ("f32", "f16", "bf16"):  # as convcore.quantize says it
        raise ConvcoreError(f"tensor {ref.name!r}: cannot quantize {dtype} "
                            f"with {scheme} (expects f32, f16 or bf16)")


def write_quantized(zf: zipfile.ZipFile, ref: TensorRef, scheme: str, search: str,
                    entry: dict[str, Any], where: str) -> float:
    """Quantize the 2-D tensor ``ref`` with ``scheme`` into the members ``entry`` names
    (``q``, ``q_scales``, ``q_zero_point`` or None), a block of rows at a time; returns
    its relative error."""
    rows, width = ref.shape
    options = {"name": ref.name, "search": search}
    if rows == 0 or width == 0:   # nothing to stream
        array = ref.load()
        qt = convcore.quantize(array, scheme, options)
        write_member(zf, entry["q"], qt.data["q"])
        write_member(zf, entry["q_scales"], qt.data["scales"])
        if entry["q_zero_point"]:
            write_member(zf, entry["q_zero_point"], qt.data["zero_points"])
        return relative_error_rows(array, scheme, qt.data)
    step = block_rows(width)
    per_tensor = scheme == "int8-tensor"
    if per_tensor:  # each block gets the tensor's one scale (the quantize option absmax)
        options["absmax"] = _largest_magnitude(ref, step)
    sums = ErrorSums(scheme, width)
    scales: list[np.ndarray] = []
    zero_points: list[np.ndarray] = []
    with ExitStack() as stack:
        writer = None
        for _, x in row_blocks(ref, step):
            data = convcore.quantize(x, scheme, options).data
            if writer is None:   # the codes' member, its header for the whole tensor first
                shape = (rows, *data["q"].shape[1:])
                writer = stack.enter_context(member_writer(zf, entry["q"], data["q"].dtype, shape, where))
            writer.write(data["q"])
            if not (per_tensor and scales):
                scales.append(data["scales"])
            if entry["q_zero_point"]:
                zero_points.append(data["zero_points"])
            sums.add(x, data)
            del data
    write_member(zf, entry["q_scales"], np.concatenate(scales))
    if entry["q_zero_point"]:
        write_member(zf, entry["q_zero_point"], np.concatenate(zero_points))
    return sums.value()
