"""Any Model -> a Parquet weight file (or a directory of part files), one tensor at a time.

Each tensor is written as its own row group (``write_table`` of a one-row table), so a
reader fetches one tensor by reading one column chunk. The ``data`` value is handed to
pyarrow as a zero-copy view of the tensor's bytes; pyarrow's own encoder and compressor
copies are what bound the peak memory (figures in docs/benchmarks.md). A source tensor
handed over as it is leaves the resident set as soon as pyarrow has copied it (when it
is in a file mapping, as safetensors sources are: :mod:`conv_parquet.memory`); a cast
or quantized one is unmapped before pyarrow starts. While pyarrow writes a small
tensor, the next small one is made on a thread (``_rows``).
"""
from __future__ import annotations

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
from .memory import LARGE, DropWhenCopied, give_back, mapped_region
from .schema import (
    DTYPE_NAMES, MAX_VALUE_BYTES, NOT_QUANTIZED, arrow_schema, code_array, f32_bytes, little_endian,
    offset_array, packed_nbytes, quant_params,
)

PART_NAME = "part-{:05d}.parquet"
# statistics make row-group pruning work in query engines (WHERE layer_name = ...); on
# the binary columns they would copy whole tensors into the footer
STATS_COLUMNS = ("layer_name", "dtype", "num_params", "quant_type", "quant_axis", "group_size")
TORCH_NAMES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


@dataclass
class Planned:
    """A tensor as it will be stored: type, scheme (None: as floats/raw) and size."""

    ref: TensorRef
    dtype: str
    scheme: str | None
    nbytes: int  # before compression: data + scales + zero points

    @property
    def stored(self) -> str:
        return self.scheme or self.dtype


def plan(model: Model, quant: str | None, dtype: str | None) -> list[Planned]:
    """What each tensor becomes. Float tensors of rank >= 2 whose rows fit the scheme's
    block are quantized; the rest (norms, biases, odd widths) stay floats."""
    registry = get_registry()
    spec = registry.scheme(quant) if quant else None
    out = []
    for ref in model.tensors.values():
        is_float = ref.dtype in FLOAT_DTYPES
        target = dtype if dtype and is_float else ref.dtype
        if (spec is not None and target in TORCH_NAMES and len(ref.shape) >= 2 and ref.numel
                and ref.shape[-1] % spec.block_size == 0):
            out.append(Planned(ref, target, quant, packed_nbytes(spec, tuple(ref.shape), target)))
        else:
            out.append(Planned(ref, target, None, ref.numel * numpy_dtype(target).itemsize))
        if out[-1].nbytes > MAX_VALUE_BYTES:  # say so before anything is written
            raise _too_large(ref.name, out[-1].nbytes)
    return out


def _too_large(name: str, nbytes: int) -> ConvcoreError:
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


def row(p: Planned, version: int, search: str = "mse") -> pa.Table:
    """The one-row table of tensor ``p`` (loads, casts and quantizes it). ``search``: how
    the asymmetric per-row schemes pick scales (other schemes ignore it)."""
    return _row(p, version, search)[0]


def _row(p: Planned, version: int, search: str) -> tuple[pa.Table, np.ndarray | None]:
    """(the one-row table of ``p``, the source array when ``data`` views it as it is)."""
    ref = p.ref
    source = array = ref.load()
    if p.dtype != ref.dtype:
        array = cast(array, p.dtype)
    columns: dict[str, Any] = {
        "layer_name": pa.array([ref.name], pa.string()),
        "shape": pa.array([list(ref.shape)], pa.list_(pa.field("element", pa.int32(), nullable=False))),
        "dtype": pa.array([DTYPE_NAMES[p.dtype]], pa.string()),
        "num_params": pa.array([ref.numel], pa.int64()),
    }
    if p.scheme is None:
        columns["data"] = _binary(array, ref.name)
        quant = dict(quant_type=NOT_QUANTIZED, scales=None, zero_points=None, quant_axis=None, group_size=None)
    else:
        spec = get_registry().scheme(p.scheme)
        qt = quantize(array, p.scheme, {"name": ref.name, "search": search})
        layout = spec.layout(tuple(ref.shape), p.dtype)
        offset = offset_array(layout)
        axis, group, _ = quant_params(spec, tuple(ref.shape), p.dtype)
        columns["data"] = _binary(qt.data[code_array(layout)], ref.name)
        quant = dict(quant_type=p.scheme, scales=f32_bytes(qt.data["scales"]),
                     zero_points=f32_bytes(qt.data[offset]) if offset else None,
                     quant_axis=axis, group_size=group)
    if version == 2:
        columns["quant_type"] = pa.array([quant["quant_type"]], pa.string())
        for key in ("scales", "zero_points"):
            columns[key] = _binary(quant[key], ref.name)
        for key in ("quant_axis", "group_size"):
            columns[key] = pa.array([quant[key]], pa.int32())
    schema = arrow_schema(version)
    as_is = array if p.scheme is None and array is source else None
    return pa.table([columns[f.name] for f in schema], schema=schema), as_is


def _write(writer: pq.ParquetWriter, p: Planned, version: int, search: str,
           built: tuple[pa.Table, np.ndarray | None] | None = None) -> None:
    """Write tensor ``p`` as one row group (``built``: its row, made ahead by
    :func:`_rows`). A large one starts and ends with pyarrow's pool handing its cached
    memory back, so neither numpy's buffers nor the next tensor's stack onto it, and its
    source's mapped pages go once pyarrow has copied them."""
    large = p.nbytes >= LARGE
    if large:
        give_back()
    table, as_is = built if built is not None else _row(p, version, search)
    del built
    region = mapped_region(as_is) if as_is is not None and large else None
    del as_is
    with DropWhenCopied(region, p.nbytes):
        writer.write_table(table)
    del table, region  # the next tensor's bytes must not pile onto this one's
    if large:
        give_back()


def _rows(part: list[Planned], version: int, search: str
          ) -> Iterator[tuple[Planned, tuple[pa.Table, np.ndarray | None] | None]]:
    """``(tensor, its row or None)`` in order. While the caller writes a small tensor
    (pyarrow encodes and compresses without the GIL), the next small one is loaded, cast
    or quantized on a thread; a large one (where the peak memory is) is never made beside
    another tensor's row, so it comes with None and the caller makes it."""
    with ThreadPoolExecutor(1, thread_name_prefix="conv-parquet-row") as pool:
        ahead: Future | None = None
        try:
            for i, p in enumerate(part):
                built = ahead.result() if ahead is not None else None
                ahead = None
                following = part[i + 1] if i + 1 < len(part) else None
                if following is not None and p.nbytes < LARGE and following.nbytes < LARGE:
                    ahead = pool.submit(_row, following, version, search)
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
    planned = plan(model, quant, dtype)
    max_bytes = options.get("split_max_size")
    # parts of at most max_bytes uncompressed (a larger tensor gets a part of its own)
    parts = plan_shards(planned, max_bytes) if max_bytes else [planned]
    if options.get("dry_run"):
        for i, part in enumerate(parts):
            for p in part:
                where = f"{PART_NAME.format(i)}\t" if max_bytes else ""
                print(f"{where}{p.ref.name}\t{p.stored}\t{list(p.ref.shape)}")
        return path
    files = [path]
    if max_bytes:
        path.mkdir(parents=True)
        files = [path / PART_NAME.format(i) for i in range(len(parts))]
    metadata = kvmeta.encode(_config(model, dtype), f"V{version}")
    schema = arrow_schema(version)
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
            for p, built in _rows(part, version, search):
                _write(writer, p, version, search, built)
                del built
                progress(p.ref.name)
            writer.add_key_value_metadata(kv)
        except (pa.ArrowException, OSError) as exc:
            raise ConvcoreError(f"{file}: cannot write Parquet: {first_line(exc)}") from None
        finally:
            writer.close()
    return path


