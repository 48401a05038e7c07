"""Lazy safetensors reading and streaming safetensors writing.

The ``safetensors`` package reads a whole tensor into memory through its numpy API and
has no bf16 numpy dtype and no incremental writer, so this module works from the
format's documented layout (8-byte little-endian header length, JSON header,
``data_offsets`` relative to the data section) to give the pipeline what it needs:
memory-mapped, per-tensor reads that stay bf16, and a writer that takes the header up
front and then one tensor at a time. Files written here load with ``safetensors``,
transformers and mlx.
"""
from __future__ import annotations

import contextvars
import os
import json
import math
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .model import ConvcoreError, TensorRef, dtype_name, numpy_dtype

ST_DTYPES = {
    "F64": "f64", "F32": "f32", "F16": "f16", "BF16": "bf16",
    "F8_E4M3": "f8_e4m3", "F8_E5M2": "f8_e5m2",
    "I64": "i64", "I32": "i32", "I16": "i16", "I8": "i8",
    "U64": "u64", "U32": "u32", "U16": "u16", "U8": "u8", "BOOL": "bool",
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit


@dataclass(frozen=True)
class Entry:
    """One tensor as a safetensors header describes it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    end: int


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_header(path: Path) -> tuple[list[Entry], dict[str, str]]:
    """Parse and check a safetensors header without reading tensor data.

    Raises :class:`ConvcoreError` naming the file for a truncated file, a bad header, an
    unknown dtype or offsets that disagree with shapes or run past the end of the file.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConvcoreError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise ConvcoreError(
                f"{path}: truncated or not safetensors (header length {n}, file has {size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except ValueError as exc:
        raise ConvcoreError(f"{path}: bad safetensors header: {exc}") from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ConvcoreError(f"{path}: bad safetensors header: __metadata__ is not an object")
    base = 8 + n
    entries = []
    for name, info in header.items():
        ok = (isinstance(info, dict) and isinstance(info.get("shape"), list)
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(_is_int(v) for v in info["shape"] + info["data_offsets"]))
        if not ok:
            raise ConvcoreError(f"{path}: bad header entry for tensor {name!r}")
        st_dtype, shape, (a, b) = info.get("dtype"), tuple(info["shape"]), info["data_offsets"]
        if not isinstance(st_dtype, str) or st_dtype not in ST_DTYPES:
            raise ConvcoreError(f"{path}: tensor {name!r} has unknown dtype {st_dtype!r}")
        dtype = ST_DTYPES[st_dtype]
        if any(d < 0 for d in shape):
            raise ConvcoreError(f"{path}: tensor {name!r} has a negative dimension {list(shape)}")
        want = math.prod(shape) * numpy_dtype(dtype).itemsize
        if not (0 <= a <= b) or b - a != want:
            raise ConvcoreError(
                f"{path}: tensor {name!r} spans {b - a} bytes but {st_dtype}{list(shape)} needs {want}")
        if base + b > size:
            raise ConvcoreError(
                f"{path}: truncated: tensor {name!r} ends at byte {base + b}, file has {size}")
        entries.append(Entry(name, dtype, shape, base + a, base + b))
    entries.sort(key=lambda e: (e.start, e.end))
    for before, after in zip(entries, entries[1:]):
        if after.start < before.end:
            raise ConvcoreError(f"{path}: tensors {before.name!r} and {after.name!r} overlap "
                                f"(bytes {after.start - base}..{before.end - base} of the data)")
    return entries, {str(k): str(v) for k, v in metadata.items()}


def _mapped_loader(path: Path, entry: Entry) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        dtype = numpy_dtype(entry.dtype)
        if entry.end == entry.start:
            return np.zeros(entry.shape, dtype=dtype)
        # A fresh map per read: pages are released with the array, so resident memory
        # stays bounded by the tensors in flight rather than growing with the file.
        mm = np.memmap(path, dtype=np.uint8, mode="r", offset=entry.start,
                       shape=(entry.end - entry.start,))
        return mm.view(dtype).reshape(entry.shape)

    return load


def open_tensors(path: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Lazy :class:`TensorRef` per tensor of a safetensors file, plus its metadata."""
    entries, metadata = read_header(path)
    refs = {
        e.name: TensorRef(e.name, e.shape, e.dtype, _mapped_loader(Path(path), e), source=str(path))
        for e in entries
    }
    return refs, metadata


class StreamingWriter:
    """Write a safetensors file whose header is known before its data.

    ``entries`` are ``(name, dtype, shape)`` in the order the data will come; call
    :meth:`write` once per entry, in that order, then :meth:`close`.
    """

    def __init__(self, path: Path, entries: Iterable[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._order: list[tuple[str, str, tuple[int, ...], int]] = []
        offset = 0
        for name, dtype, shape in entries:
            shape = tuple(int(d) for d in shape)
            nbytes = math.prod(shape) * numpy_dtype(dtype).itemsize
            header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, dtype, shape, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, data: np.ndarray | Iterable[np.ndarray]) -> None:
        """Append the data of the next tensor, which must be ``name``: an array of the
        declared shape, or an iterable of flat chunks of the declared dtype."""
        want_name, dtype, shape, nbytes = self._order[self._next]
        if name != want_name:
            raise ConvcoreError(f"{self.path}: expected tensor {want_name!r} next, got {name!r}")
        if isinstance(data, np.ndarray):
            if dtype_name(data.dtype) != dtype or tuple(data.shape) != shape:
                raise ConvcoreError(
                    f"{self.path}: tensor {name!r} is {dtype_name(data.dtype)}{list(data.shape)}, "
                    f"declared {dtype}{list(shape)}")
            data = (data,)
        written = 0
        for chunk in data:
            if dtype_name(chunk.dtype) != dtype:
                raise ConvcoreError(f"{self.path}: tensor {name!r} chunk is "
                                    f"{dtype_name(chunk.dtype)}, declared {dtype}")
            # file.write, not ndarray.tofile: tofile writes through a C FILE of its own
            # and drops a failed flush (a full disk) without an error
            self._file.write(memoryview(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)))
            written += chunk.nbytes
        if written != nbytes:
            raise ConvcoreError(f"{self.path}: tensor {name!r} got {written} bytes, declared {nbytes}")
        self._next += 1

    def abort(self) -> None:
        """Close the file after a failure (the caller removes the partial output)."""
        self._file.close()

    def close(self) -> None:
        if self._next != len(self._order):
            self._file.close()
            raise ConvcoreError(
                f"{self.path}: {len(self._order) - self._next} declared tensors were not written")
        self._file.close()


def hub_blobs(root: Path) -> Path | None:
    """The blob store of a Hugging Face hub cache snapshot ``models--org--name/snapshots/
    <rev>/``, whose files are symlinks into ``../../blobs/``; None for other directories."""
    snapshots = Path(os.path.abspath(root)).parent
    if snapshots.name == "snapshots" and snapshots.parent.name.startswith("models--"):
        return (snapshots.parent / "blobs").resolve()
    return None


def inside_model(file: Path, root: Path) -> Path:
    """``file``, checked to lead (through any symlinks) to a place inside the model
    directory ``root`` (or, for a hub cache snapshot, into its repository's blob store):
    a link out of the directory is how a hostile download would read other files."""
    file = Path(file)
    target, real_root = file.resolve(), Path(root).resolve()
    blobs = hub_blobs(Path(root))
    for allowed in (real_root, blobs):
        if allowed is not None and (target == allowed or allowed in target.parents):
            return file
    raise ConvcoreError(f"{file}: leads to {target}, outside the model directory {real_root}; "
                        "refusing to read it")


def index_shards(index: Path) -> list[Path]:
    """The shard files an HF-style ``*.index.json`` names, in order, each checked to be a
    plain file name that exists beside the index (and, if a link, leads inside its
    directory)."""
    import json as _json

    index = Path(index)
    try:
        weight_map = _json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError) as exc:
        raise ConvcoreError(f"{index}: not a readable index ({exc})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConvcoreError(f"{index}: no weight_map")
    files = []
    for fname in dict.fromkeys(weight_map.values()):
        if not isinstance(fname, str) or Path(fname).name != fname:
            raise ConvcoreError(f"{index}: shard name {fname!r} is not a plain file name")
        if not (index.parent / fname).is_file():
            raise ConvcoreError(f"{index}: names shard {fname!r}, which is missing")
        files.append(inside_model(index.parent / fname, index.parent))
    return files


@dataclass
class PlannedTensor:
    """A tensor to write: its name, dtype and shape up front, its data on demand."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[], "np.ndarray | Iterable[np.ndarray]"]  # array or flat chunks

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * numpy_dtype(self.dtype).itemsize


def plan_shards(tensors: list[Any], max_shard_size: int) -> list[list[Any]]:
    """Group tensors (anything with ``nbytes``) in order into shards of at most
    ``max_shard_size`` bytes each (a single larger tensor gets a shard of its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


#: what the hf writer lets write_sharded hold to produce the next tensor while it writes
AHEAD_BYTES = 192 << 20


def read_ahead(chunks: Iterable[Any], pool: ThreadPoolExecutor) -> Iterator[Any]:
    """``chunks`` with the next one made on ``pool``'s thread while the caller uses this
    one (a dequantizer or cast then overlaps the writing; memory holds one chunk more).
    The items are made one at a time, in the caller's context; an error making one is
    raised where the caller takes it. Leaving early waits for the chunk in the making."""
    it = iter(chunks)
    end = object()
    run = contextvars.copy_context().run
    pending: Future | None = pool.submit(run, next, it, end)
    try:
        while True:
            chunk = pending.result()
            if chunk is end:
                pending = None
                return
            pending = pool.submit(run, next, it, end)
            yield chunk
    finally:
        if pending is not None:
            pending.cancel()
            try:
                pending.result()
            except BaseException:  # noqa: BLE001 - the caller's own error is the one raised
                pass


def with_user_metadata(own: dict[str, str], user: dict[str, Any] | None, where: str) -> dict[str, str]:
    """A safetensors header's ``__metadata__``: the writer's ``own`` entries (``format``,
    which loaders check) and the user's ``--metadata`` entries as strings. A user key that
    would replace one of ``own`` is one error line."""
    user = {str(k): str(v) for k, v in (user or {}).items()}
    clash = sorted(set(user) & set(own))
    if clash:
        raise ConvcoreError(f"--metadata {clash[0]}: {where} keeps its own {clash[0]!r} entry "
                            "in the safetensors header; choose another key")
    return {**own, **user}


def write_sharded(
    directory: Path,
    tensors: list[PlannedTensor],
    *,
    max_shard_size: int,
    metadata: dict[str, str] | None = None,
    stem: str = "model",
    always_index: bool = False,
    on_written: Callable[[PlannedTensor], None] | None = None,
    ahead_bytes: int = 0,
) -> list[Path]:
    """Write ``tensors`` as HF-style safetensors shards plus index into ``directory``.

    One shard is ``{stem}.safetensors``; several are ``{stem}-00001-of-0000N.safetensors``
    with ``{stem}.safetensors.index.json``, written also for one shard when
    ``always_index`` (as mlx-lm does). Each tensor is produced, written and dropped in
    turn. With ``ahead_bytes``, the next tensor is produced on a thread while one is
    written when the two together come to at most that (a reader's dequantizing then
    overlaps the writing; memory holds two such tensors); ``produce`` calls never overlap.
    Returns the shard paths.
    """
    directory = Path(directory)
    shards = plan_shards(tensors, max_shard_size)
    n = len(shards)
    names = ([f"{stem}.safetensors"] if n == 1 else
             [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    weight_map: dict[str, str] = {}
    paths = []
    order = [t for shard in shards for t in shard]
    index = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="convcore-ahead") as pool, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="convcore-chunks") as chunk_pool:
        ahead: Future | None = None
        try:
            for shard, fname in zip(shards, names):
                writer = StreamingWriter(directory / fname,
                                         [(t.name, t.dtype, t.shape) for t in shard], metadata)
                try:
                    for t in shard:
                        data = ahead.result() if ahead is not None else t.produce()
                        ahead = None
                        nxt = order[index + 1] if index + 1 < len(order) else None
                        if nxt is not None and t.nbytes + nxt.nbytes <= ahead_bytes:
                            # the caller's context (its registry) goes with the task
                            ahead = pool.submit(contextvars.copy_context().run, nxt.produce)
                        if not isinstance(data, np.ndarray):  # chunks: make the next while
                            data = read_ahead(data, chunk_pool)  # this one is written
                        writer.write(t.name, data)
                        del data
                        index += 1
                        weight_map[t.name] = fname
                        if on_written:
                            on_written(t)
                except BaseException:
                    writer.abort()
                    raise
                writer.close()
                paths.append(directory / fname)
        finally:
            if ahead is not None:
                ahead.cancel()
                try:
                    ahead.result()
                except BaseException:  # noqa: BLE001 - the first error is the one raised
                    pass
    if n > 1 or always_index:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
                 "weight_map": dict(sorted(weight_map.items()))}
        (directory / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return paths
