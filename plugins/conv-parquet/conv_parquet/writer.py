"""Any Model -> a Parquet weight file (or a directory of part files), one tensor at a time.

Each tensor is written as its own row group (``write_table`` of a one-row table), so a
reader fetches one tensor by reading one column chunk; a tensor over ``chunk_size`` as
one row group per chunk (slices of its first axis, made from the tensor loaded once;
per-row and grouped schemes quantize each slice, a per-tensor one the whole tensor), so
pyarrow's copies are a chunk's, not the tensor's. The ``data`` value is handed to
pyarrow as a zero-copy view of the tensor's bytes; pyarrow's own encoder and compressor
copies are what bound the peak memory (figures in docs/benchmarks.md). A source tensor
handed over as it is leaves the resident set as soon as pyarrow has copied it (when it
is in a file mapping, as safetensors sources are: :mod:`conv_parquet.memory`); a cast
or quantized one is unmapped before pyarrow starts. While pyarrow writes a small
tensor, the next small one is made on a thread (``_rows``).
"""
from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from convcore import (
    FLOAT_DTYPES, ConvcoreError, Model, first_line, TensorRef, cast, get_registry, numpy_dtype, plan_shards,
    quantize,
)

from . import kv as kvmeta
from . import schema as schema_module
from .memory import LARGE, DropWhenCopied, give_back, mapped_region
from .schema import (
    DTYPE_NAMES, MAX_VALUE_BYTES, NOT_QUANTIZED, arrow_schema, code_array, f32_bytes, little_endian,
    PER_TENSOR_AXIS, offset_array, packed_nbytes, quant_params,
)

PART_NAME = "part-{:05d}.parquet"
# statistics make row-group pruning work in query engines (WHERE layer_name = ...); on
# the binary columns they would copy whole tensors into the footer
STATS_COLUMNS = ("layer_name", "dtype", "num_params", "quant_type", "quant_axis", "group_size", "chunk",
                 "row_start")
#: a tensor over this many bytes is stored as rows of about this size (option chunk_size)
DEFAULT_CHUNK = 64 << 20
TORCH_NAMES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


@dataclass
class Planned:
    """A tensor as it will be stored: type, scheme (None: as floats/raw), size, and the
    ranges of its first axis each of its rows holds (empty: one row, the whole tensor)."""

    ref: TensorRef
    dtype: str
    scheme: str | None
    nbytes: int  # before compression: data + scales + zero points
    chunks: tuple[tuple[int, int], ...] = ()

    @property
    def stored(self) -> str:
        return self.scheme or self.dtype

    @property
    def row_nbytes(self) -> int:
        """The bytes of its largest row (about: scales are spread evenly)."""
        if not self.chunks:
            return self.nbytes
        return -(-self.nbytes * max(b - a for a, b in self.chunks) // self.ref.shape[0])


def plan(model: Model, quant: str | None, dtype: str | None, chunk_size: int | None = None) -> list[Planned]:
    """What each tensor becomes. Float tensors of rank >= 2 whose rows fit the scheme's
    block are quantized; the rest (norms, biases, odd widths) stay floats. A tensor over
    ``chunk_size`` bytes (stored, or as floats before quantization) is split into rows of
    whole indices of its first axis."""
    registry = get_registry()
    spec = registry.scheme(quant) if quant else None
    out = []
    for ref in model.tensors.values():
        is_float = ref.dtype in FLOAT_DTYPES
        target = dtype if dtype and is_float else ref.dtype
        if (spec is not None and target in TORCH_NAMES and len(ref.shape) >= 2 and ref.numel
                and ref.shape[-1] % spec.block_size == 0):
            p = Planned(ref, target, quant, packed_nbytes(spec, tuple(ref.shape), target))
        else:
            p = Planned(ref, target, None, ref.numel * numpy_dtype(target).itemsize)
        # a quantized tensor by its float size too: quantizing a slice at a time is what
        # keeps its temporaries (float32 copies of the input) the size of a chunk
        handled = max(p.nbytes, ref.numel * numpy_dtype(target).itemsize)
        p.chunks = chunk_ranges(tuple(ref.shape), handled, chunk_size)
        out.append(p)
        if p.row_nbytes > MAX_VALUE_BYTES:  # say so before anything is written
            raise _too_large(ref.name, p.row_nbytes, bool(p.chunks))
    return out


def chunk_ranges(shape: tuple[int, ...], nbytes: int, chunk_size: int | None) -> tuple[tuple[int, int], ...]:
    """``[start, stop)`` ranges of the first axis, each at most ``chunk_size`` bytes (at
    least one index), for a tensor over ``chunk_size``; () for one that stays a row."""
    if not chunk_size or nbytes <= chunk_size or not shape or shape[0] < 2:
        return ()
    step = max(1, chunk_size // -(-nbytes // shape[0]))
    if step >= shape[0]:
        return ()
    return tuple((a, min(a + step, shape[0])) for a in range(0, shape[0], step))


def _too_large(name: str, nbytes: int, chunked: bool = False) -> ConvcoreError:
    if chunked:  # one index of the first axis cannot be split further
        return ConvcoreError(f"tensor {name!r}: one index of its first axis is {nbytes} bytes; "
                             "a Parquet value holds at most 2 GiB")
    return ConvcoreError(f"tensor {name!r} is {nbytes} bytes; a Parquet value holds at most "
                         "2 GiB: quantize it (--quant) or store a narrower --dtype")


def _binary(array: np.ndarray | None, name: str) -> pa.Array:
    """A one-value binary array viewing ``array``'s bytes (no copy); null for None."""
    if array is None:
        return pa.nulls(1, pa.binary())
    raw = little_endian(array).reshape(-1).view(np.uint8)
    if raw.size > MAX_VALUE_BYTES:
        raise _too_large(name, raw.size)
    offsets = pa.py_buffer(np.array([0, raw.size], np.int32))
    return pa.Array.from_buffers(pa.binary(), 1, [None, offsets, pa.py_buffer(raw)])


def row(p: Planned, version: int, search: str = "mse", chunked: bool = False) -> pa.Table:
    """The one-row table of tensor ``p`` (loads, casts and quantizes it). ``search``: how
    the asymmetric per-row schemes pick scales (other schemes ignore it); ``chunked``:
    with the (null) chunk columns."""
    return _row(p, version, search, chunked)[0]


def _row(p: Planned, version: int, search: str, chunked: bool = False
         ) -> tuple[pa.Table, np.ndarray | None]:
    """(the one-row table of ``p``, the source array when ``data`` views it as it is)."""
    return _table(p, p.ref.load(), version, search, chunked)


def _per_tensor(p: Planned) -> bool:
    """Whether ``p``'s scheme has one scale for the whole tensor."""
    spec = get_registry().scheme(p.scheme)
    return quant_params(spec, tuple(p.ref.shape), p.dtype)[0] == PER_TENSOR_AXIS


def _table(p: Planned, source: np.ndarray, version: int, search: str, chunked: bool,
           chunk: tuple[int, int, int] | None = None, whole: Any = None
           ) -> tuple[pa.Table, np.ndarray | None]:
    """(the one-row table of ``p`` or, with ``chunk`` (index, start, stop), of that slice
    of its first axis, the source array when ``data`` views it as it is). ``whole``: the
    whole tensor quantized, for schemes with one scale for the tensor (sliced here)."""
    ref = p.ref
    index, start, stop = chunk if chunk is not None else (None, 0, ref.shape[0] if ref.shape else 0)
    array = source if chunk is None else source[start:stop]
    view = array
    if p.dtype != ref.dtype:
        array = cast(array, p.dtype)
    shape = tuple(array.shape)
    columns: dict[str, Any] = {
        "layer_name": pa.array([ref.name], pa.string()),
        "shape": pa.array([list(ref.shape)], pa.list_(pa.field("element", pa.int32(), nullable=False))),
        "dtype": pa.array([DTYPE_NAMES[p.dtype]], pa.string()),
        "num_params": pa.array([array.size], pa.int64()),
        "chunk": pa.array([index], pa.int32()),
        "row_start": pa.array([None if index is None else start], pa.int64()),
    }
    if p.scheme is None:
        columns["data"] = _binary(array, ref.name)
        quant = dict(quant_type=NOT_QUANTIZED, scales=None, zero_points=None, quant_axis=None, group_size=None)
    else:
        spec = get_registry().scheme(p.scheme)
        layout = spec.layout(shape, p.dtype)
        code, offset = code_array(layout), offset_array(layout)
        if whole is None:
            arrays = quantize(array, p.scheme, {"name": ref.name, "search": search}).data
        else:
            arrays = {k: _slice(whole.data[k], layout[k][1], ref.shape[0], start, stop)
                      for k in (code, "scales", offset) if k}
        axis, group, _ = quant_params(spec, shape, p.dtype)
        columns["data"] = _binary(arrays[code], ref.name)
        quant = dict(quant_type=p.scheme, scales=f32_bytes(arrays["scales"]),
                     zero_points=f32_bytes(arrays[offset]) if offset else None,
                     quant_axis=axis, group_size=group)
    if version == 2:
        columns["quant_type"] = pa.array([quant["quant_type"]], pa.string())
        for key in ("scales", "zero_points"):
            columns[key] = _binary(quant[key], ref.name)
        for key in ("quant_axis", "group_size"):
            columns[key] = pa.array([quant[key]], pa.int32())
    schema = arrow_schema(version, chunked)
    as_is = view if p.scheme is None and array is view else None
    return pa.table([columns[f.name] for f in schema], schema=schema), as_is


def _slice(array: np.ndarray, shape: tuple[int, ...], lead: int, start: int, stop: int) -> np.ndarray:
    """Indices ``[start, stop)`` of the first axis (of ``lead``) of a whole tensor's
    layout array, whose slice has ``shape``: the whole array when it is one scale."""
    want = math.prod(shape)
    if array.size == want:
        return array  # shared by every chunk (the tensor's one scale)
    part = array.reshape(lead, -1)[start:stop]
    if part.size != want:
        raise ConvcoreError(f"a layout array of {array.size} values does not split by the first axis")
    return part.reshape(shape)


def _put(writer: pq.ParquetWriter, table: pa.Table, as_is: np.ndarray | None, nbytes: int) -> None:
    """Write ``table`` as one row group. A large one starts and ends with pyarrow's pool
    handing its cached memory back, so neither numpy's buffers nor the next tensor's
    stack onto it, and its source's mapped pages go once pyarrow has copied them."""
    large = nbytes >= LARGE
    region = mapped_region(as_is) if as_is is not None and large else None
    del as_is
    with DropWhenCopied(region, nbytes):
        writer.write_table(table)
    del table, region  # the next tensor's bytes must not pile onto this one's
    if large:
        give_back()


def _write(writer: pq.ParquetWriter, p: Planned, version: int, search: str, chunked: bool = False,
           built: tuple[pa.Table, np.ndarray | None] | None = None) -> None:
    """Write tensor ``p``: one row group (``built``: its row, made ahead by :func:`_rows`),
    or one per chunk, each made from the tensor loaded once."""
    if p.chunks:
        _write_chunks(writer, p, version, search)
        return
    if p.nbytes >= LARGE:
        give_back()
    table, as_is = built if built is not None else _row(p, version, search, chunked)
    del built
    _put(writer, table, as_is, p.nbytes)


def _write_chunks(writer: pq.ParquetWriter, p: Planned, version: int, search: str) -> None:
    large = p.row_nbytes >= LARGE
    if large:
        give_back()
    source = p.ref.load()
    whole = None
    if p.scheme is not None and _per_tensor(p):  # one scale for the tensor: from all of it
        whole = quantize(cast(source, p.dtype) if p.dtype != p.ref.dtype else source, p.scheme,
                         {"name": p.ref.name, "search": search})
    for i, (start, stop) in enumerate(p.chunks):
        table, as_is = _table(p, source, version, search, True, (i, start, stop), whole)
        _put(writer, table, as_is, p.row_nbytes)
        del table, as_is


def _rows(part: list[Planned], version: int, search: str, chunked: bool = False
          ) -> Iterator[tuple[Planned, tuple[pa.Table, np.ndarray | None] | None]]:
    """``(tensor, its row or None)`` in order. While the caller writes a small tensor
    (pyarrow encodes and compresses without the GIL), the next small one is loaded, cast
    or quantized on a thread; a large or chunked one (where the peak memory is) is never
    made beside another tensor's row, so it comes with None and the caller makes it."""
    with ThreadPoolExecutor(1, thread_name_prefix="conv-parquet-row") as pool:
        ahead: Future | None = None
        try:
            for i, p in enumerate(part):
                built = ahead.result() if ahead is not None else None
                ahead = None
                following = part[i + 1] if i + 1 < len(part) else None
                if (following is not None and p.nbytes < LARGE and following.nbytes < LARGE
                        and not p.chunks and not following.chunks):
                    ahead = pool.submit(_row, following, version, search, chunked)
                yield p, built
                del built
        finally:
            if ahead is not None:
                ahead.cancel()


def _config(model: Model, dtype: str | None) -> Model:
    """``model`` whose config names the dtype it is stored in, as the hf writer does."""
    if not dtype:
        return model
    config = dict(model.config)
    config["dtype"] = TORCH_NAMES[dtype]
    if "torch_dtype" in config:
        config["torch_dtype"] = TORCH_NAMES[dtype]
    return Model(model.arch, config, model.tensors, model.tokenizer, model.metadata, model.source, model.format)


def write_parquet(model: Model, path: Path, options: dict[str, Any],
                  progress: Callable[[str], None]) -> Path:
    """Write ``model`` to ``path``: a file, or with ``split_max_size`` a directory of
    ``part-00000.parquet``, ... (the config and tokenizer in the first part's metadata)."""
    quant, dtype = options.get("quant"), options.get("dtype")
    version = 2 if quant else 1
    chunk_size = options.get("chunk_size") or DEFAULT_CHUNK
    if not 0 < chunk_size <= schema_module.MAX_VALUE_BYTES:
        raise ConvcoreError(f"format parquet: option chunk_size={chunk_size} is not between 1 byte and 2 GiB")
    planned = plan(model, quant, dtype, chunk_size)
    chunked = any(p.chunks for p in planned)
    max_bytes = options.get("split_max_size")
    # parts of at most max_bytes uncompressed (a larger tensor gets a part of its own)
    parts = plan_shards(planned, max_bytes) if max_bytes else [planned]
    if options.get("dry_run"):
        for i, part in enumerate(parts):
            for p in part:
                where = f"{PART_NAME.format(i)}\t" if max_bytes else ""
                rows = f"\t{len(p.chunks)} chunks" if p.chunks else ""
                print(f"{where}{p.ref.name}\t{p.stored}\t{list(p.ref.shape)}{rows}")
        return path
    files = [path]
    if max_bytes:
        path.mkdir(parents=True)
        files = [path / PART_NAME.format(i) for i in range(len(parts))]
    metadata = kvmeta.encode(_config(model, dtype), f"V{version}")
    schema = arrow_schema(version, chunked)
    settings = dict(compression=options.get("compression") or "zstd",
                    compression_level=options.get("compression_level"), use_dictionary=False,
                    write_statistics=[c for c in STATS_COLUMNS if c in schema.names], store_schema=False)
    for i, (file, part) in enumerate(zip(files, parts)):
        kv = dict(metadata) if i == 0 else {}
        if max_bytes:
            kv[kvmeta.PART] = f"{i}/{len(parts)}"
        try:
            writer = pq.ParquetWriter(str(file), schema, **settings)
        except (pa.ArrowException, ValueError) as exc:
            raise ConvcoreError(f"{file}: cannot write Parquet: {first_line(exc)}") from None
        try:
            search = options.get("row_search") or "mse"
            for p, built in _rows(part, version, search, chunked):
                _write(writer, p, version, search, chunked, built)
                del built
                progress(p.ref.name)
            writer.add_key_value_metadata(kv)
        except (pa.ArrowException, OSError) as exc:
            raise ConvcoreError(f"{file}: cannot write Parquet: {first_line(exc)}") from None
        finally:
            writer.close()
    return path


