"""Any Model -> a Parquet weight file (or a directory of part files), one row at a time.

Each tensor is written as its own row group (a one-row table), so a reader fetches one
tensor by reading one column chunk; a tensor over ``chunk_size`` as one row group per
chunk (slices of its first axis, made from the tensor loaded once; each slice is
quantized on its own, with a per-tensor scheme given the tensor's largest magnitude from
a first pass over it), so pyarrow's copies are a chunk's, not the tensor's. The ``data`` value is handed to pyarrow as a zero-copy
view of the tensor's bytes; pyarrow's own encoder and compressor copies are what bound
the peak memory (figures in docs/benchmarks.md). A source tensor handed over as it is
leaves the resident set as soon as pyarrow has copied it (when it is in a file mapping,
as safetensors sources are: :mod:`conv_parquet.memory`); a cast or quantized one as
soon as it is made.

Rows are made (loaded, cast, quantized), encoded and compressed on ``threads`` threads,
each row by pyarrow as a one-row-group file in memory, and spliced into the output in
row order (:mod:`conv_parquet.splice`): the file is byte for byte what one pyarrow
writer writes, in a fraction of the time on several cores.
"""
from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from convcore import (
    FLOAT_DTYPES, ConvcoreError, Model, first_line, TensorRef, cast, cast_chunks, get_registry, numpy_dtype,
    plan_shards, quantize,
)

from . import kv as kvmeta
from . import schema as schema_module
from .memory import LARGE, DropWhenCopied, give_back, mapped_region
from .splice import Fragment, SplicedFile
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
DEFAULT_CHUNK = 16 << 20
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
        # a quantized tensor by its size as float32 too: the kernels work on a float32
        # copy of each slice, so that copy is what a chunk bounds
        handled = max(p.nbytes, ref.numel * (4 if p.scheme else numpy_dtype(target).itemsize))
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


def _row(p: Planned, version: int, search: str, chunked: bool = False, kernel_threads: int | None = None
         ) -> tuple[pa.Table, np.ndarray | None]:
    """(the one-row table of ``p``, the source array when ``data`` views it as it is)."""
    return _table(p, p.ref.load(), version, search, chunked, kernel_threads=kernel_threads)


def _per_tensor(p: Planned) -> bool:
    """Whether ``p``'s scheme has one scale for the whole tensor."""
    spec = get_registry().scheme(p.scheme)
    return quant_params(spec, tuple(p.ref.shape), p.dtype)[0] == PER_TENSOR_AXIS


def _table(p: Planned, source: np.ndarray, version: int, search: str, chunked: bool,
           chunk: tuple[int, int, int] | None = None, absmax: float | None = None,
           kernel_threads: int | None = None) -> tuple[pa.Table, np.ndarray | None]:
    """(the one-row table of ``p`` or, with ``chunk`` (index, start, stop), of that slice
    of its first axis, the source array when ``data`` views it as it is). ``absmax``: the
    whole tensor's largest magnitude, for schemes with one scale for the tensor;
    ``kernel_threads``: the most threads the scheme's kernels may use."""
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
        options = _quant_options(ref.name, search, kernel_threads)
        if absmax is not None:
            options["absmax"] = absmax
        arrays = quantize(array, p.scheme, options).data
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


def _quant_options(name: str, search: str, kernel_threads: int | None = None) -> dict[str, Any]:
    options: dict[str, Any] = {"name": name, "search": search}
    if kernel_threads:
        options["threads"] = kernel_threads
    return options


@dataclass(frozen=True)
class _Job:
    """One row to write: tensor ``p`` whole (``chunk`` None) or its chunk ``chunk``."""

    p: Planned
    chunk: int | None

    @property
    def nbytes(self) -> int:
        return self.p.nbytes if self.chunk is None else self.p.row_nbytes

    @property
    def last(self) -> bool:
        return self.chunk is None or self.chunk == len(self.p.chunks) - 1


def _jobs(part: list[Planned]) -> list[_Job]:
    return [_Job(p, i) for p in part for i in (range(len(p.chunks)) if p.chunks else (None,))]


class _Maker:
    """Makes rows of jobs, on any thread: a whole tensor's, or one chunk's. A chunked
    tensor is loaded once (and for a scheme with one scale per tensor its largest
    magnitude found, a piece at a time) by whichever thread makes its first chunk, and
    let go when its chunks are all made; every chunk of such a tensor must come back with
    the same scale (a scheme that ignores the option ``absmax`` is refused). A chunk whose row holds its own bytes (cast or quantized) lets the source
    pages it came from go at once."""

    def __init__(self, version: int, search: str, chunked: bool, kernel_threads: int | None = None):
        self.version, self.search, self.chunked = version, search, chunked
        self.kernel_threads = kernel_threads
        self._lock = threading.Lock()
        self._held: dict[str, list[Any]] = {}  # name -> [source, absmax, chunks left, scale]

    def __call__(self, job: _Job) -> tuple[pa.Table, np.ndarray | None]:
        p = job.p
        if job.chunk is None:
            return _row(p, self.version, self.search, self.chunked, self.kernel_threads)
        with self._lock:
            held = self._held.get(p.ref.name)
            if held is None:
                source, absmax = p.ref.load(), None
                if p.scheme is not None and _per_tensor(p):  # one scale for the tensor: from all of it
                    absmax = _largest_magnitude(p, source)
                held = self._held[p.ref.name] = [source, absmax, len(p.chunks), None]
        source, absmax = held[0], held[1]
        start, stop = p.chunks[job.chunk]
        try:
            made = _table(p, source, self.version, self.search, True, (job.chunk, start, stop), absmax,
                          self.kernel_threads)
            if absmax is not None:
                self._same_scale(p, held, made[0])
        finally:
            with self._lock:
                held[2] -= 1
                if held[2] == 0:
                    del self._held[p.ref.name]
        if made[1] is None:
            region = mapped_region(source[start:stop])
            if region is not None:
                region.drop()
        return made


    @staticmethod
    def _same_scale(p: Planned, held: list[Any], table: pa.Table) -> None:
        scale = table.column("scales")[0].as_py() if "scales" in table.column_names else None
        if scale is None:
            return
        if held[3] is None:
            held[3] = scale
        elif held[3] != scale:
            raise ConvcoreError(f"tensor {p.ref.name!r}: scheme {p.scheme} gave its chunks different "
                                "scales (it ignores the option absmax); write it whole with a larger "
                                "-O chunk_size")


def _largest_magnitude(p: Planned, source: np.ndarray) -> float:
    """The largest |x| of ``source`` cast to ``p``'s dtype, found a piece at a time (a
    mapped source's pages leave behind)."""
    largest = np.float32(0)
    for piece in cast_chunks(source, p.dtype, 1 << 20):
        if piece.size:
            largest = np.maximum(largest, np.abs(piece.astype(np.float32, copy=False)).max())
    if not np.isfinite(largest):
        raise ConvcoreError(f"tensor {p.ref.name!r}: {p.scheme}: NaN or Inf in input")
    return float(largest)


def _fragment(make: _Maker, job: _Job, schema: pa.Schema, settings: dict[str, Any]) -> Fragment:
    """Job ``job``'s row written by pyarrow as a one-row-group file in memory. The mapped
    source pages the row views go once pyarrow has copied them (for a large one while it
    writes: :class:`DropWhenCopied`), so a tensor written a chunk at a time never has
    more than a few chunks of them resident."""
    table, as_is = make(job)
    region = mapped_region(as_is) if as_is is not None else None
    del as_is
    with DropWhenCopied(region, job.nbytes):
        written = _written(table, schema, settings, job.nbytes)
    del table, region
    return Fragment(written)


def _written(table: pa.Table, schema: pa.Schema, settings: dict[str, Any], nbytes: int) -> pa.Buffer:
    """``table`` as a Parquet file in memory: in one buffer allocated for the worst case
    (a growing one copies itself over and over), or where that is short (a codec that
    expands the values more than that), a growing one."""
    room = pa.allocate_buffer(nbytes + nbytes // 64 + (256 << 10))
    try:
        sink = pa.FixedSizeBufferWriter(room)
        with pq.ParquetWriter(sink, schema, **settings) as writer:
            writer.write_table(table)
        return room.slice(0, sink.tell())
    except (pa.ArrowException, OSError):
        del room
        growing = pa.BufferOutputStream()
        with pq.ParquetWriter(growing, schema, **settings) as writer:
            writer.write_table(table)
        return growing.getvalue()


def _fragments(part: list[Planned], make: _Maker, schema: pa.Schema, settings: dict[str, Any],
               threads: int) -> Iterator[tuple[_Job, Fragment]]:
    """``(job, its fragment)`` for every row of ``part`` in file order, made, encoded and
    compressed by pyarrow on ``threads`` threads (it does so without the GIL): ``threads``
    rows are being made while the caller writes the one handed out (with only
    ``threads - 1`` beside the write, a core sat idle while the page cache took it: 1.1B
    V1 9.0 -> 6.0-6.4 s); a row of :data:`LARGE` bytes or more (where the peak memory is)
    is made alone, between the pool's memory handed back."""
    jobs = _jobs(part)
    with ThreadPoolExecutor(threads, thread_name_prefix="conv-parquet-row") as pool:
        pending: deque[tuple[_Job, Future]] = deque()
        k = 0
        try:
            while k < len(jobs) or pending:
                while k < len(jobs) and len(pending) <= threads:  # the one written, and threads being made
                    job = jobs[k]
                    if pending and (job.nbytes >= LARGE or pending[-1][0].nbytes >= LARGE):
                        break  # a large row is made with nothing beside it
                    if job.nbytes >= LARGE:
                        give_back()
                    pending.append((job, pool.submit(_fragment, make, job, schema, settings)))
                    k += 1
                job, future = pending.popleft()
                fragment = future.result()
                yield job, fragment
                del fragment
                if job.nbytes >= LARGE:
                    give_back()
        finally:
            for _, future in pending:
                future.cancel()


def _config(model: Model, dtype: str | None) -> Model:
    """``model`` whose config names the dtype it is stored in, as the hf writer does."""
    if not dtype:
        return model
    config = dict(model.config)
    config["dtype"] = TORCH_NAMES[dtype]
    if "torch_dtype" in config:
        config["torch_dtype"] = TORCH_NAMES[dtype]
    return Model(model.arch, config, model.tensors, model.tokenizer, model.metadata, model.source, model.format)


def default_threads() -> int:
    """Threads that make and compress rows: the CPUs this process may use, at most 4
    (each holds a few chunks of memory)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 4))


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
    try:  # the settings, before anything is written
        pq.ParquetWriter(pa.BufferOutputStream(), schema, **settings).close()
    except (pa.ArrowException, ValueError) as exc:
        raise ConvcoreError(f"{files[0]}: cannot write Parquet: {first_line(exc)}") from None
    search = options.get("row_search") or "mse"
    threads = options.get("threads") or default_threads()
    for i, (file, part) in enumerate(zip(files, parts)):
        kv = dict(metadata) if i == 0 else {}
        if max_bytes:
            kv[kvmeta.PART] = f"{i}/{len(parts)}"
        try:
            if not part:  # no rows: pyarrow's own empty file
                with pq.ParquetWriter(str(file), schema, **settings) as writer:
                    writer.add_key_value_metadata(kv)
                continue
            with open(file, "wb") as sink:
                spliced = SplicedFile(sink)
                # several rows at once: each row's kernels on its own thread, not contending
                make = _Maker(version, search, chunked, 1 if threads > 1 else None)
                for job, fragment in _fragments(part, make, schema, settings, threads):
                    spliced.append(fragment)
                    del fragment
                    if job.last:
                        progress(job.p.ref.name)
                spliced.close(kv)
        except (pa.ArrowException, OSError) as exc:
            raise ConvcoreError(f"{file}: cannot write Parquet: {first_line(exc)}") from None
    return path


