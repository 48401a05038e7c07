"""Parquet weight file (or part directory) -> an index of rows, lazy tensors, a Model.

Opening reads each part's footer and the small columns (names, shapes, dtypes, quant
parameters) of every row; tensor bytes are read one row group at a time, with the
footer already parsed, so a tensor costs one column-chunk read. Sizes declared in the
file are checked against the bytes actually read before anything is allocated from them.

A large value (:data:`conv_parquet.memory.LARGE`) is read through a read-only map of
its file instead: its compressed chunk then leaves the resident set as soon as pyarrow
has decompressed it, rather than staying beside the decompressed page and the decoded
array until the read ends (:mod:`conv_parquet.memory`).
"""
from __future__ import annotations

import math
import mmap
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from convcore import (
    ConvcoreError, Model, first_line, TensorRef, arch_of, cast, get_registry, numpy_dtype, read_json,
    read_tokenizer_files, row_block_loaders,
)

from . import kv as kvmeta
from .chunks import Chunk, assemble, chunk_shape
from .memory import LARGE, DropWhenCopied, Region, give_back
from .schema import (
    CHUNK_COLUMNS, MAGIC, NOT_QUANTIZED, checked_shape, code_array, dtype_from_column, has_chunks,
    offset_array, packed_nbytes, quant_params, restore_scales, schema_version,
)

# elements a scheme dequantizes at once when a tensor is dequantized a block of rows at a
# time (convcore's row blocks, with this size instead of its default): the scheme's float32
# temporaries (256 KB each) then stay in the CPU cache and the C heap; blocks of 1-16 MB
# took page faults on every call.
DEQUANT_CHUNK = 1 << 16
# a scheme's float32 temporaries while it dequantizes, in multiples of its result (the
# per-row schemes: the codes as float32, minus the zero points, times the scales)
DEQUANT_TEMPORARIES = 3
SMALL_COLUMNS = ("layer_name", "shape", "dtype", "num_params")
SMALL_QUANT_COLUMNS = ("quant_type", "quant_axis", "group_size")


@dataclass(frozen=True)
class Row:
    """One tensor's row: what the small columns say and where its bytes are."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # canonical; for a quantized row the type it was quantized from
    quant: str  # "" when stored as is
    axis: int | None
    group: int | None
    part: int
    row_group: int
    index: int  # within the row group
    #: a tensor stored as several rows: those rows, in order, each a Row of its slice
    #: (shape: its own; ``start``: where it starts on the tensor's first axis)
    chunks: tuple["Row", ...] = ()
    start: int = 0
    chunk: int | None = None  # a chunk's Row: its place in the tensor

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def part_files(path: Path) -> list[Path]:
    """The file itself, or a directory's ``*.parquet`` files by name (hidden and ``_``
    files skipped, as Spark and pyarrow.dataset do)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConvcoreError(f"{path}: no such file or directory")
    files = sorted(p for p in path.iterdir()
                   if p.suffix == ".parquet" and p.is_file() and not p.name.startswith((".", "_")))
    if not files:
        raise ConvcoreError(f"{path}: a directory without *.parquet files")
    return files


def _check_ends(file: Path) -> None:
    """A one-line error for a file that is not Parquet or lost its end (the footer, which
    says where everything is, is written last)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(4)
            f.seek(max(size - 4, 0))
            tail = f.read(4)
    except OSError as exc:
        raise ConvcoreError(f"{file}: cannot read ({exc.strerror or exc})") from None
    if head != MAGIC:
        raise ConvcoreError(f"{file}: not a Parquet file (it does not start with PAR1)")
    if size < 12 or tail != MAGIC:
        raise ConvcoreError(f"{file}: truncated: no Parquet footer at its end ({size} bytes)")




class WeightTable:
    """An opened weight file. ``problems``: collect one-line problems in it instead of
    raising at the first (validation)."""

    def __init__(self, path: Path, problems: list[str] | None = None):
        self.path = Path(path)
        self.problems = problems
        self.files = part_files(self.path)
        self.footers: list[pq.FileMetaData] = []
        self.kv: dict[str, str] = {}
        self.version = 0
        for file in self.files:
            _check_ends(file)
            try:
                footer = pq.read_metadata(file)
            except (pa.ArrowException, OSError) as exc:
                raise ConvcoreError(f"{file}: not a readable Parquet file ({first_line(exc)})") from None
            version = schema_version(footer.schema.to_arrow_schema(), str(file))
            if self.version and version != self.version:
                raise ConvcoreError(f"{file}: schema V{version}, but {self.files[0].name} is V{self.version}")
            self.version = version
            self.footers.append(footer)
            for key, value in kvmeta.as_text(footer.metadata).items():
                self.kv.setdefault(key, value)
        self._check_parts()
        self.rows: dict[str, Row] = {}
        self._pending: dict[str, list[Chunk]] = {}
        self._broken: set[str] = set()
        for part in range(len(self.files)):
            self._index(part)
        self._assemble()
        self._largest_out: int | None = None

    def bad(self, message: str) -> None:
        if self.problems is None:
            raise ConvcoreError(message)
        self.problems.append(message)

    def _check_parts(self) -> None:
        declared = {}
        for file, footer in zip(self.files, self.footers):
            part = kvmeta.part_of(kvmeta.as_text(footer.metadata), str(file))
            if part is not None:
                declared[part[0]] = (part[1], file)
        if not declared:
            return
        count = next(iter(declared.values()))[0]
        missing = [i for i in range(count) if i not in declared]
        if missing or len(declared) != len(self.files) or any(c != count for c, _ in declared.values()):
            self.bad(f"{self.path}: holds {len(self.files)} part files, but they say there are {count}"
                     + (f" (part {missing[0]} missing)" if missing else ""))

    def _index(self, part: int) -> None:
        file, footer = self.files[part], self.footers[part]
        columns = list(SMALL_COLUMNS) + (list(SMALL_QUANT_COLUMNS) if self.version == 2 else [])
        if has_chunks(footer.schema.to_arrow_schema()):
            columns += CHUNK_COLUMNS
        try:
            with pq.ParquetFile(file, metadata=footer) as pf:
                table = pf.read(columns=columns, use_threads=False)
        except (pa.ArrowException, OSError) as exc:
            raise ConvcoreError(f"{file}: cannot read its columns ({first_line(exc)})") from None
        values = {c: table.column(c).to_pylist() for c in columns}
        chunk_of = values.get("chunk") or [None] * table.num_rows
        row_group, start = 0, 0
        for i, name in enumerate(values["layer_name"]):
            while i - start >= footer.row_group(row_group).num_rows:
                start += footer.row_group(row_group).num_rows
                row_group += 1
            where = f"{file}: row {i}" + (f" ({name!r})" if name else "")
            try:
                entry, whole = self._row(values, i, name, where, part, row_group, i - start)
            except ConvcoreError as exc:
                self.bad(str(exc))
                self._broken.add(str(name))  # said once: its other chunks are not missing
                continue
            first = self.rows.get(entry.name)
            pending = self._pending.get(entry.name)
            if whole is not None and (first is None or pending is not None):
                if pending is None:
                    self.rows[entry.name] = entry  # its place in the file's order
                    pending = self._pending[entry.name] = []
                pending.append(Chunk(chunk_of[i], entry, whole))
                continue
            if first is not None:
                self.bad(f"{file}: tensor name {entry.name!r} appears twice (also row group "
                         f"{first.row_group} of {self.files[first.part].name})")
                continue
            self.rows[entry.name] = entry

    def _assemble(self) -> None:
        """Chunked tensors from their rows: complete, in order, not overlapping, alike."""
        for name, chunks in self._pending.items():
            if name in self._broken:
                del self.rows[name]
                continue
            try:
                self.rows[name] = assemble(lambda part: self.files[part], name, chunks)
            except ConvcoreError as exc:
                del self.rows[name]
                self.bad(str(exc))
        self._pending.clear()

    def _row(self, values: dict[str, list], i: int, name: Any, where: str, part: int,
             row_group: int, index: int) -> tuple[Row, tuple[int, ...] | None]:
        """Row ``i``, and for a chunk the whole tensor's shape (its Row has its slice's)."""
        if not name:
            raise ConvcoreError(f"{where}: empty layer_name")
        shape = checked_shape(values["shape"][i], where)
        dtype = dtype_from_column(values["dtype"][i], where)
        start, whole = 0, None
        if "chunk" in values and values["chunk"][i] is not None:
            whole, (shape, start) = shape, chunk_shape(values, i, shape, where)
        elif values["num_params"][i] != math.prod(shape):
            raise ConvcoreError(f"{where}: num_params {values['num_params'][i]} but shape "
                                f"{list(shape)} has {math.prod(shape)}")
        quant, axis, group = "", None, None
        if self.version == 2:
            quant = values["quant_type"][i] or ""
            quant = "" if quant == NOT_QUANTIZED else quant
            axis, group = values["quant_axis"][i], values["group_size"][i]
            if quant and dtype not in ("f32", "f16", "bf16"):
                raise ConvcoreError(f"{where}: quant_type {quant} from dtype {dtype}; expected a float type")
        return Row(str(name), shape, dtype, quant, axis, group, part, row_group, index, start=start), whole

    # reading ----------------------------------------------------------------------
    def where(self, row: Row) -> str:
        chunk = "" if row.chunk is None else f", chunk {row.chunk}"
        return f"{self.files[row.part]}: tensor {row.name!r}{chunk}"

    def value_nbytes(self, row: Row, column: str = "data") -> int:
        """The size the file declares for ``column``'s chunk in ``row``'s row group,
        uncompressed (0 when the footer does not say)."""
        group = self.footers[row.part].row_group(row.row_group)
        for i in range(group.num_columns):
            chunk = group.column(i)
            if chunk.path_in_schema == column:
                return max(int(chunk.total_uncompressed_size), 0)
        return 0

    def read(self, row: Row, columns: tuple[str, ...]) -> dict[str, pa.Buffer | None]:
        """The values of ``columns`` in ``row``: one row group's column chunks. Without
        pre-buffering or threads: for one large chunk they only add work. Around a large
        value pyarrow's pool hands the memory it keeps for reuse back, so that neither
        what came before nor the decompressed page stacks onto what comes next (smaller
        ones keep it: reading them again then takes no page faults)."""
        file, footer = self.files[row.part], self.footers[row.part]
        nbytes = self.value_nbytes(row)
        large = nbytes >= LARGE
        if large:
            give_back()
        mapped = _map(file) if large else None
        try:
            with DropWhenCopied(Region(mapped, 0, len(mapped)) if mapped is not None else None, nbytes):
                table = _read_row_group(mapped if mapped is not None else file, footer, row.row_group, columns)
        except (pa.ArrowException, OSError) as exc:
            raise ConvcoreError(f"{self.where(row)}: cannot read row group {row.row_group} "
                                f"({first_line(exc)})") from None
        finally:
            if mapped is not None:
                _unmap(mapped)
        if large:
            give_back()
        return {c: _value(table.column(c), row.index) for c in columns}

    def stored_nbytes(self, row: Row) -> int:
        """A quantized row's packed bytes (0: as shape x dtype, or the scheme is missing)."""
        if row.chunks:
            return sum(self.stored_nbytes(c) for c in row.chunks)
        try:
            return packed_nbytes(get_registry().scheme(row.quant), row.shape, row.dtype) if row.quant else 0
        except ConvcoreError:
            return 0

    def out_dtype(self, row: Row) -> str:
        """The type ``load`` hands back: the stored type, or for a quantized row the type
        of its scheme's scales (f32 per row; the source type for affine groups), which
        holds the dequantized values exactly."""
        if not row.quant:
            return row.dtype
        try:
            return get_registry().scheme(row.quant).layout(row.shape, row.dtype)["scales"][0]
        except ConvcoreError:
            return "f32"  # the scheme is not installed: load() says so

    def out_nbytes(self, row: Row) -> int:
        return row.numel * numpy_dtype(self.out_dtype(row)).itemsize

    def whole(self, row: Row) -> bool:
        """Whether quantized ``row`` is dequantized in one piece: when the scheme's
        temporaries for it take no more memory than the file's largest tensor does
        anyway (which is dequantized a slice at a time), so the peak stays where the
        largest tensor puts it while the other tensors get no copy from slice to result."""
        if self._largest_out is None:
            self._largest_out = max((self.out_nbytes(r) for r in self.rows.values()), default=0)
        return DEQUANT_TEMPORARIES * self.out_nbytes(row) <= self._largest_out

    def check(self, row: Row, registry: Any = None) -> None:
        """Read ``row`` (each of its chunks, one at a time) and check every size."""
        for piece in row.chunks or (row,):
            self.payload(piece, registry)

    def payload(self, row: Row, registry: Any = None) -> tuple[Any, dict[str, np.ndarray]]:
        """(scheme or None, arrays) of ``row`` (one row: a tensor or one of its chunks)
        with every size checked: the tensor itself, or the scheme's payload in its layout."""
        if row.chunks:
            raise ValueError(f"{row.name}: a chunked tensor has a payload per chunk")
        where = self.where(row)
        if not row.quant:
            raw = self.read(row, ("data",))["data"]
            want = row.numel * numpy_dtype(row.dtype).itemsize
            _check_size(raw, want, where, "data", f"shape {list(row.shape)} of {row.dtype}")
            array = np.frombuffer(raw, numpy_dtype(row.dtype)).reshape(row.shape)
            return None, {"data": array.byteswap() if sys.byteorder == "big" else array}
        try:
            spec = (registry or get_registry()).scheme(row.quant)
        except ConvcoreError as exc:
            raise ConvcoreError(f"{where}: quant_type {row.quant!r}: {exc}") from None
        try:
            layout = spec.layout(row.shape, row.dtype)
            if "scales" not in layout:
                raise ConvcoreError(f"its layout {sorted(layout)} has no scales")
            axis, group, n_scales = quant_params(spec, row.shape, row.dtype)
        except (ConvcoreError, ArithmeticError, LookupError, TypeError, ValueError) as exc:
            raise ConvcoreError(f"{where}: quant_type {row.quant!r} cannot be stored in a row of "
                                f"shape {list(row.shape)} of {row.dtype}: {first_line(exc)}") from None
        if (row.axis, row.group) != (axis, group):
            raise ConvcoreError(f"{where}: quant_axis {row.axis} / group_size {row.group}, but "
                                f"{row.quant} on shape {list(row.shape)} has {axis} / {group}")
        values = self.read(row, ("data", "scales", "zero_points"))
        code, offset = code_array(layout), offset_array(layout)
        code_dtype, code_shape = layout[code]
        _check_size(values["data"], math.prod(code_shape) * numpy_dtype(code_dtype).itemsize, where,
                    "data", f"{row.quant} codes of shape {list(row.shape)}")
        scale_dtype, scale_shape = layout["scales"]
        fit = f"quant_axis {axis}, group_size {group} on shape {list(row.shape)}"
        _check_size(values["scales"], 4 * n_scales, where, "scales", fit)
        payload = {code: np.frombuffer(values["data"], numpy_dtype(code_dtype)).reshape(code_shape),
                   "scales": restore_scales(values["scales"], scale_dtype, scale_shape)}
        if offset:
            _check_size(values["zero_points"], 4 * n_scales, where, "zero_points", fit)
            payload[offset] = restore_scales(values["zero_points"], layout[offset][0], layout[offset][1])
        elif values["zero_points"] is not None and values["zero_points"].size:
            raise ConvcoreError(f"{where}: zero_points given, but {row.quant} is symmetric")
        return spec, payload

    def pieces(self, row: Row, dtype: str) -> Iterator[np.ndarray]:
        """Quantized or chunked ``row`` as flat pieces of ``dtype``: a chunk at a time,
        dequantized a slice at a time."""
        if row.chunks:
            for chunk in row.chunks:
                if chunk.quant:
                    yield from self.pieces(chunk, dtype)
                else:
                    yield cast(self.tensor(chunk), dtype).reshape(-1)
            return
        spec, payload = self.payload(row)
        try:
            yield from dequantized_pieces(spec, payload, row.shape, dtype, DEQUANT_CHUNK)
        except ValueError as exc:
            raise ConvcoreError(f"{self.where(row)}: {row.quant}: {exc}") from None
        del payload
        if self.value_nbytes(row) >= LARGE:
            give_back()  # the codes, kept by the pool

    def tensor(self, row: Row) -> np.ndarray:
        """The tensor of ``row``, dequantized when quantized (exactly as the scheme does);
        a chunked one read and put in place a chunk at a time."""
        if row.chunks:
            out = np.empty(row.shape, numpy_dtype(self.out_dtype(row)))

            def put(chunk: Row) -> None:
                out[chunk.start:chunk.start + chunk.shape[0]] = self.tensor(chunk)
            if len(row.chunks) > 1 and all(self.value_nbytes(c) < LARGE for c in row.chunks):
                # two at a time: pyarrow decompresses and the kernels dequantize without
                # the GIL, so two cores share a tensor (a large chunk is read alone)
                with ThreadPoolExecutor(2, thread_name_prefix="conv-parquet-read") as pool:
                    for _ in pool.map(put, row.chunks):
                        pass
            else:
                for chunk in row.chunks:
                    put(chunk)
            return out
        spec, payload = self.payload(row)
        if spec is None:
            return payload["data"]
        try:
            out = dequantize_rows(spec, payload, row.shape, self.out_dtype(row), DEQUANT_CHUNK,
                                  whole=self.whole(row))
        except ValueError as exc:
            raise ConvcoreError(f"{self.where(row)}: {row.quant}: {exc}") from None
        del payload
        if self.value_nbytes(row) >= LARGE:
            give_back()  # the codes, kept by the pool
        return out


def _row_maker(spec: Any, payload: dict[str, np.ndarray], shape: tuple[int, ...],
               dtype: str) -> Callable[[int, int], np.ndarray]:
    """``rows(a, b)``: rows ``[a, b)`` of the dequantized tensor as ``dtype``. Arrays with a
    row each (codes, per-row scales) are sliced; others (one scale) are shared."""
    n = shape[-1] if shape else 1
    rows = math.prod(shape) // n if n else 0
    by_row = {k: (a.reshape(rows, -1) if _lead(a) == rows else None) for k, a in payload.items()}

    def make(a: int, b: int) -> np.ndarray:
        part = {k: (payload[k] if r is None else r[a:b]) for k, r in by_row.items()}
        return cast(np.asarray(spec.dequantize(part, (b - a, n)), np.float32).reshape(b - a, n), dtype)
    return make


def dequantized_pieces(spec: Any, payload: dict[str, np.ndarray], shape: tuple[int, ...],
                       dtype: str, chunk: int | None = None) -> Iterator[np.ndarray]:
    """``spec.dequantize(payload, shape)`` as flat pieces of ``dtype``, a block of whole rows
    at a time (convcore's row blocks; ``chunk`` elements when given): what a streaming
    writer takes, so neither the float32 values nor the output tensor are ever whole."""
    _, pieces = row_block_loaders(shape, _row_maker(spec, payload, shape, dtype), dtype,
                                  block_elements=chunk)
    return pieces(dtype)


def dequantize_rows(spec: Any, payload: dict[str, np.ndarray], shape: tuple[int, ...],
                    dtype: str, chunk: int | None = None, whole: bool = False) -> np.ndarray:
    """``spec.dequantize(payload, shape)`` as ``dtype``, a block of rows at a time
    (convcore's row blocks; ``chunk`` elements when given), or at once when ``whole``. Every scheme the format stores computes each row on its
    own, so the result is the same bit for bit, while the scheme's float32 temporaries stay
    the size of a block; in one piece the scheme's result is handed back as it is."""
    if whole:
        return cast(np.asarray(spec.dequantize(payload, shape), np.float32).reshape(shape), dtype)
    load, _ = row_block_loaders(shape, _row_maker(spec, payload, shape, dtype), dtype,
                                block_elements=chunk)
    return load()


def _read_row_group(source: Path | mmap.mmap, footer: pq.FileMetaData, row_group: int,
                    columns: tuple[str, ...]) -> pa.Table:
    """``columns`` of one row group, from a file or a map of it (pyarrow slices a map's
    pages where it would read the file: the compressed chunk is never copied)."""
    where: Any = pa.BufferReader(pa.py_buffer(source)) if isinstance(source, mmap.mmap) else str(source)
    with pq.ParquetFile(where, metadata=footer, pre_buffer=False) as pf:
        return pf.read_row_group(row_group, columns=list(columns), use_threads=False)


def _map(file: Path) -> mmap.mmap | None:
    """A read-only map of ``file`` (None where it cannot be mapped: read it instead)."""
    try:
        with open(file, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None


def _unmap(mapped: mmap.mmap) -> None:
    """Unmap now unless an Arrow buffer still views the map (then it goes with them)."""
    try:
        mapped.close()
    except BufferError:
        pass


def _lead(array: np.ndarray) -> int:
    """How many rows ``array`` spans: the product of all axes but the last (a 1-D array:
    its length)."""
    return math.prod(array.shape[:-1]) if array.ndim > 1 else (array.shape[0] if array.ndim else 0)


def _value(column: pa.ChunkedArray, index: int) -> pa.Buffer | None:
    """Value ``index`` of a binary column as a slice of the column's own buffer: a
    scalar's ``as_buffer()`` copies the value, which for a tensor is its whole size."""
    for chunk in column.chunks:
        if index >= len(chunk):
            index -= len(chunk)
            continue
        if chunk.is_null().to_pylist()[index] if chunk.null_count else False:
            return None
        if not (pa.types.is_binary(chunk.type) or pa.types.is_large_binary(chunk.type)):
            return chunk[index].as_buffer()  # view types: rare, small files from other tools
        width = np.int32 if pa.types.is_binary(chunk.type) else np.int64
        offsets = np.frombuffer(chunk.buffers()[1], width)[chunk.offset + index:chunk.offset + index + 2]
        return chunk.buffers()[2].slice(int(offsets[0]), int(offsets[1] - offsets[0]))
    raise IndexError(index)


def _check_size(raw: pa.Buffer | None, want: int, where: str, column: str, what: str) -> None:
    if raw is None:
        raise ConvcoreError(f"{where}: {column} is null; {what} needs {want} bytes")
    if raw.size != want:
        raise ConvcoreError(f"{where}: {column} holds {raw.size} bytes; {what} needs {want}")


def load_parquet(path: Path) -> Model:
    """Describe the weight file (or part directory) ``path`` as a lazy HF-named model. A
    file without config in its metadata (as other tools write it) takes config.json and
    tokenizer files from beside it when there are any."""
    table = WeightTable(path)
    config, tokenizer, metadata = kvmeta.decode(table.kv, str(path))
    if config is None and (path.parent / "config.json").is_file():
        config = read_json(path.parent / "config.json")
        tokenizer = read_tokenizer_files(path.parent)
        if (path.parent / "generation_config.json").is_file():
            metadata["generation_config"] = read_json(path.parent / "generation_config.json")
    config = config if isinstance(config, dict) else {}
    tensors = {}
    for name, row in table.rows.items():
        # quantized rows also come a slice at a time, for writers that stream (hf)
        pieces = (lambda dtype, r=row: table.pieces(r, dtype)) if row.quant or row.chunks else None
        tensors[name] = TensorRef(name, row.shape, table.out_dtype(row),
                                  (lambda r=row: table.tensor(r)), source=str(table.files[row.part]),
                                  stored=row.quant, stored_nbytes=table.stored_nbytes(row),
                                  chunk_loader=pieces)
    arch = table.kv.get("convcore.arch") or (arch_of(config) if config else "unknown")
    metadata["source"] = str(path)
    return Model(arch=arch, config=config, tensors=tensors, tokenizer=tokenizer, metadata=metadata,
                 source=str(path), format="parquet")
