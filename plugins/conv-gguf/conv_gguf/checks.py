"""A bounds-checked walk over a GGUF header, done before gguf-py's reader sees the file.

gguf-py trusts the counts and lengths in the header; a truncated or hostile file can
make it loop for ages or allocate without bound. Every count and length here is checked
against the bytes left in the file first, so a bad file costs one line of error.
"""
from __future__ import annotations

import functools
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from convcore import ConvcoreError

from . import arch_table, archs
from .shards import shard_paths

# value type -> fixed size in bytes (strings and arrays are variable)
FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9
MAX_DIMS = 4


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]      # numpy order
    gtype: int
    offset: int                 # from the start of the data section
    nbytes: int


@dataclass
class Header:
    version: int
    kv: dict[str, object]       # scalars and strings; arrays as their length
    tensors: list[TensorInfo]
    data_start: int
    file_size: int


class _Cursor:
    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ConvcoreError(f"{self.path}: truncated GGUF header while reading {what} "
                                f"(needs {n} bytes at offset {self.pos}, file has {len(self.data)})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def string(self, what: str) -> str:
        n = self.u64(what)
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConvcoreError(f"{self.path}: {what} is not UTF-8") from None


NUMPY_OF = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
            10: "<u8", 11: "<i8", 12: "<f8"}


def _value(cur: _Cursor, vtype: int, key: str, keep_arrays: bool = False) -> object:
    if vtype in FIXED:
        raw = cur.take(FIXED[vtype], f"value of {key!r}")
        fmt = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
               10: "<Q", 11: "<q", 12: "<d"}[vtype]
        return struct.unpack(fmt, raw)[0]
    if vtype == STRING:
        return cur.string(f"value of {key!r}")
    if vtype == ARRAY:
        sub = cur.u32(f"array type of {key!r}")
        count = cur.u64(f"array length of {key!r}")
        left = len(cur.data) - cur.pos
        if sub in FIXED:
            if count * FIXED[sub] > left:
                raise ConvcoreError(f"{cur.path}: key {key!r} claims {count} array items, "
                                    f"more than the {left} bytes left")
            raw = cur.take(count * FIXED[sub], f"array {key!r}")
            if keep_arrays:
                return np.frombuffer(raw, dtype=NUMPY_OF[sub]).tolist()
        elif sub == STRING:
            if count * 8 > left:
                raise ConvcoreError(f"{cur.path}: key {key!r} claims {count} strings, "
                                    f"more than the {left} bytes left")
            items = [cur.take(cur.u64(f"string in {key!r}"), f"string in {key!r}")
                     for _ in range(count)]
            if keep_arrays:
                try:
                    return [item.decode("utf-8") for item in items]
                except UnicodeDecodeError:
                    raise ConvcoreError(f"{cur.path}: a string in {key!r} is not UTF-8") from None
        else:
            raise ConvcoreError(f"{cur.path}: key {key!r} has arrays of type {sub}, "
                                "which GGUF does not define")
        return count
    raise ConvcoreError(f"{cur.path}: key {key!r} has value type {vtype}, which GGUF does not define")


def read_header(path: Path, keep_arrays: bool = False) -> Header:
    """Parse and bounds-check the header of one GGUF file (tensor data is not read).
    Array values are kept (as lists) with ``keep_arrays``, else only their lengths."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(24)
            if head[:4] != b"GGUF":
                raise ConvcoreError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected b'GGUF')")
            if len(head) < 24:
                raise ConvcoreError(f"{path}: truncated GGUF header ({size} bytes)")
            version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
            if version not in (2, 3):
                raise ConvcoreError(f"{path}: GGUF version {version}, expected 2 or 3")
            # each KV takes at least 8+1+4 bytes and each tensor info 8+1+4+8+4+8
            if n_kv * 13 > size or n_tensors * 33 > size:
                raise ConvcoreError(f"{path}: header claims {n_tensors} tensors and {n_kv} keys, "
                                    f"impossible in a file of {size} bytes")
            # mapped, not read: slices copy only the few bytes each field takes
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise ConvcoreError(f"{path}: cannot read ({exc.strerror})") from None
    cur = _Cursor(data, path)
    cur.pos = 24
    kv: dict[str, object] = {}
    for i in range(n_kv):
        key = cur.string(f"key #{i}")
        vtype = cur.u32(f"type of {key!r}")
        kv[key] = _value(cur, vtype, key, keep_arrays)
    tensors = []
    for i in range(n_tensors):
        name = cur.string(f"tensor name #{i}")
        n_dims = cur.u32(f"dims of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise ConvcoreError(f"{path}: tensor {name!r} has {n_dims} dimensions, expected 1..{MAX_DIMS}")
        ne = [cur.u64(f"shape of {name!r}") for _ in range(n_dims)]
        gtype = cur.u32(f"type of {name!r}")
        offset = cur.u64(f"offset of {name!r}")
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(gtype)]
        except (ValueError, KeyError):
            raise ConvcoreError(f"{path}: tensor {name!r} has type {gtype}, unknown to gguf") from None
        if ne[0] % block != 0:
            raise ConvcoreError(f"{path}: tensor {name!r} has rows of {ne[0]}, not a multiple of "
                                f"its type's block of {block}")
        numel = 1
        for d in ne:
            numel *= d
        nbytes = numel // block * type_size
        if nbytes > size:
            raise ConvcoreError(f"{path}: tensor {name!r} needs {nbytes} bytes, more than the file's {size}")
        tensors.append(TensorInfo(name, tuple(reversed(ne)), gtype, offset, nbytes))
    align = kv.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise ConvcoreError(f"{path}: general.alignment {align!r} is not a power of two")
    data_start = (cur.pos + align - 1) // align * align
    for t in tensors:
        if data_start + t.offset + t.nbytes > size:
            raise ConvcoreError(f"{path}: tensor {t.name!r} lies past the end of the file "
                                f"(offset {data_start + t.offset} + {t.nbytes} bytes > {size})")
        if t.offset % align:
            raise ConvcoreError(f"{path}: tensor {t.name!r} has offset {t.offset}, not a multiple "
                                f"of the alignment {align}")
    placed = sorted(tensors, key=lambda t: (t.offset, t.nbytes))
    for before, after in zip(placed, placed[1:]):
        if after.offset < before.offset + before.nbytes:
            raise ConvcoreError(f"{path}: tensors {before.name!r} and {after.name!r} overlap "
                                f"(bytes {after.offset}..{before.offset + before.nbytes} of the data)")
    data.close()
    return Header(version, kv, tensors, data_start, size)


def adapter_problems(path: Path, arch: str, kv: dict[str, object], tensors: list[TensorInfo]) -> list[str]:
    """Problems llama.cpp's adapter loader would meet: its keys, paired ``.lora_a`` /
    ``.lora_b`` tensors of the architecture's weights, ranks that agree."""
    if kv.get("adapter.type") != "lora":
        return [f"{path}: adapter.type is {kv.get('adapter.type')!r}, expected 'lora'"]
    if not isinstance(kv.get("adapter.lora.alpha"), float):
        return [f"{path}: no adapter.lora.alpha key"]
    pairs: dict[str, dict[str, TensorInfo]] = {}
    for t in tensors:
        base, dot, kind = t.name.rpartition(".")
        if not dot or kind not in ("lora_a", "lora_b"):
            return [f"{path}: tensor {t.name!r} is not a .lora_a or .lora_b tensor"]
        pairs.setdefault(base, {})[kind] = t
    names_of = tensor_names(arch)
    for base, pair in pairs.items():
        if len(pair) != 2:
            return [f"{path}: {base} has only {next(iter(pair))}"]
        if names_of is not None and not names_of.fullmatch(base):
            return [f"{path}: {base!r} is not a tensor of architecture {arch}"]
        a, b = pair["lora_a"].shape, pair["lora_b"].shape
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            return [f"{path}: {base}: lora_a {list(a)} and lora_b {list(b)} disagree on the rank"]
    return [] if pairs else [f"{path}: the adapter holds no tensors"]


def validate(path: Path) -> list[str]:
    """One-line problems with a GGUF file (and its split siblings); empty when valid."""
    problems: list[str] = []
    try:
        paths = shard_paths(Path(path))
    except ConvcoreError as exc:
        return [str(exc)]
    headers = []
    for p in paths:
        try:
            headers.append(read_header(p))
        except ConvcoreError as exc:
            problems.append(str(exc))
    if problems:
        return problems
    first = headers[0].kv
    arch = first.get("general.architecture")
    if not isinstance(arch, str):
        return [f"{path}: no general.architecture key"]
    if first.get("general.type") == "adapter":
        return adapter_problems(path, arch, first, [t for h in headers for t in h.tensors])
    known = arch_table.read_back()
    if arch in known:
        spec = known[arch]
        for key in spec.base_required + spec.required:
            if f"{arch}.{key}" not in first:
                problems.append(f"{path}: missing key {arch}.{key}")
    names = [t.name for h in headers for t in h.tensors]
    blocks = first.get(f"{arch}.block_count")
    if names and arch in known and isinstance(blocks, int):
        if "token_embd.weight" not in names:
            problems.append(f"{path}: no token_embd.weight tensor")
        stray = [n for n in names if n.startswith("blk.") and int(n.split(".")[1]) >= blocks]
        if stray:
            problems.append(f"{path}: tensor {stray[0]!r} is beyond block_count {blocks}")
        if names and not any(n.startswith(f"blk.{blocks - 1}.") for n in names):
            problems.append(f"{path}: block_count is {blocks} but there is no blk.{blocks - 1}.* tensor")
    names_of = tensor_names(arch)
    if names_of is not None:  # llama.cpp refuses a tensor its architecture does not have
        stranger = next(((n, p) for h, p in zip(headers, paths) for n in (t.name for t in h.tensors)
                         if not names_of.fullmatch(n)), None)
        if stranger is not None:
            problems.append(f"{stranger[1]}: tensor {stranger[0]!r} is not a tensor of "
                            f"architecture {arch} (gguf's MODEL_TENSORS)")
    if len(set(names)) != len(names):
        problems.append(f"{path}: duplicate tensor names")
    if "split.tensors.count" in first and first["split.tensors.count"] != len(names):
        problems.append(f"{path}: split.tensors.count is {first['split.tensors.count']} "
                        f"but the shards hold {len(names)} tensors")
    # (overlapping tensor data is refused by read_header already)
    try:  # the vocabulary as loading reads it: strings decoded, types and lengths checked
        problem = vocab_problem(read_header(paths[0], keep_arrays=True).kv)
        if problem:
            problems.append(f"{paths[0]}: {problem}")
    except ConvcoreError as exc:
        problems.append(str(exc))
    for i, (h, p) in enumerate(zip(headers, paths)):
        problem = split_problem(p, i, len(paths), h.kv)
        if problem:
            problems.append(problem)
    return problems


@functools.cache
def tensor_names(arch: str) -> re.Pattern | None:
    """The tensor names gguf-py (mirroring llama.cpp) lists for ``arch``, as one pattern
    (``blk.{bid}.attn_q`` + ``.weight`` / ``.bias`` ...); None for an architecture it
    does not know."""
    kind = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    if kind is None or kind not in gguf.MODEL_TENSORS:
        return None
    stems = [re.escape(gguf.TENSOR_NAMES[t]).replace(re.escape("{bid}"), r"\d+")
             for t in gguf.MODEL_TENSORS[kind] if t in gguf.TENSOR_NAMES]
    return re.compile(rf"(?:{'|'.join(stems)})(?:\.[a-z_0-9]+)?")


#: llama.cpp's token types (LLAMA_TOKEN_TYPE_*): undefined, normal, unknown, control,
#: user-defined, unused, byte
TOKEN_TYPES = range(0, 7)


def vocab_problem(kv: dict[str, Any]) -> str | None:
    """What is wrong with the vocabulary arrays of a header read with ``keep_arrays``
    (llama.cpp indexes scores and types by token id, so they must be as long as the
    token list), or None."""
    tokens = kv.get("tokenizer.ggml.tokens")
    if tokens is None:
        return None
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        return "tokenizer.ggml.tokens is not an array of strings"
    for key, valid in (("tokenizer.ggml.scores", None), ("tokenizer.ggml.token_type", TOKEN_TYPES)):
        values = kv.get(key)
        if values is None:
            continue
        if not isinstance(values, list) or len(values) != len(tokens):
            n = len(values) if isinstance(values, list) else "not an array of"
            return f"{key} has {n} values for {len(tokens)} tokens"
        if valid is not None:
            bad = next(((i, v) for i, v in enumerate(values)
                        if not isinstance(v, int) or v not in valid), None)
            if bad is not None:
                return (f"{key} of token {bad[0]} is {bad[1]!r}; llama.cpp's token types are "
                        f"{valid.start}..{valid.stop - 1}")
    return None


def split_problem(path: Path, index: int, count: int, kv: dict[str, Any]) -> str | None:
    """Whether shard ``index`` of ``count`` (its place by file name) says the same in its
    ``split.no`` / ``split.count``: a shard copied or renamed over another would otherwise
    read as a smaller model. The problem, or None."""
    no, total = kv.get("split.no", 0), kv.get("split.count", 1)
    if (count > 1 or total != 1) and (no != index or total != count):
        return (f"{path}: split.no {no!r} of split.count {total!r}, but its name makes it "
                f"shard {index} (from 0) of {count}")
    return None
