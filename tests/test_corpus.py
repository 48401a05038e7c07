"""A corpus of hostile and broken inputs, generated here for every loader (hf safetensors
and .bin, gguf single and split, mlx, npz, onnx, parquet): truncation at many offsets,
flipped header bytes, declared sizes and counts far beyond the file, negative and
overflowing shapes and offsets, overlapping tensor data, data lengths that disagree with
shapes, unknown dtypes and GGUF types, non-finite weights, unknown architectures, missing
and broken tokenizer files, names with ``..``, absolute paths and symlinks leading out of
the model directory, and pickles that would run code.

Every case is loaded and each of its tensors read. What may come out is a model or one
:class:`convcore.ConvcoreError` line naming a file of the case; nothing else, and no
allocation beyond a small multiple of the case's size (``tracemalloc`` sees numpy's
buffers). Cases with an ``expect`` must fail with that text; cases with a ``target`` are
converted too, and then must leave no output and an unchanged source. Each loader's case
count is quoted in docs/reliability.md (checked below)."""
from __future__ import annotations

import json
import re
import shutil
import struct
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import convcore
from convcore.testing import tree_digest
from convcore.testing.models import tiny_model

ROOT = Path(__file__).resolve().parents[1]
MARKER = "pwned-by-pickle"  # what a hostile pickle would create if it ever ran


@dataclass
class Case:
    id: str
    fmt: str
    build: Callable[[Path], Path]        # fills an empty folder, returns the input path
    expect: str | None = None            # the error must hold this; None: model or error
    target: tuple[str, str | None] | None = None  # also convert it to (format, quant)


# the good inputs every case starts from, built once per session -------------------------
_BASES: dict[str, Path] = {}


def base(kind: str) -> Path:
    if kind not in _BASES:
        import tempfile

        recipes = {"gguf": ("gguf", "q8_0", "m.gguf", {}),
                   "gguf-split": ("gguf", "q8_0", "m.gguf", {"split_max_tensors": 8}),
                   "mlx": ("mlx", "int4-g64", "m", {}), "npz": ("npz", "int8-row", "m", {}),
                   "onnx": ("onnx", "int4-b32", "m", {}),
                   "parquet": ("parquet", "int8-row", "m.parquet", {}),
                   "parquet-v1": ("parquet", None, "m.parquet", {})}
        if kind == "hf":
            _BASES[kind] = tiny_model("llama")
        elif kind == "hf-sharded":
            _BASES[kind] = tiny_model("llama", max_shard_size="1MB")
        elif kind == "bin":
            _BASES[kind] = tiny_model("llama", bin=True)
        else:
            fmt, quant, name, options = recipes[kind]
            if fmt not in convcore.get_registry().formats:
                pytest.skip(f"no {fmt} plugin")
            out = Path(tempfile.mkdtemp(prefix=f"corpus-{kind}-")) / name
            convcore.convert(tiny_model("llama"), out, to=fmt, quant=quant, options=options)
            _BASES[kind] = out.parent if kind == "gguf-split" else out
    return _BASES[kind]


def copy_of(kind: str, root: Path) -> Path:
    src = base(kind)
    dst = root / src.name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


# byte-level mutations --------------------------------------------------------------------
def offsets(size: int, head: int, n_head: int, n_rest: int) -> list[int]:
    """Spread points: ``n_head`` in the first ``head`` bytes (all of them when fewer),
    ``n_rest`` over the rest, plus the edges."""
    head = min(head, size)
    picks = set(np.linspace(0, head - 1, min(n_head, head)).astype(int).tolist())
    if size > head:
        picks |= set(np.linspace(head, size - 1, n_rest).astype(int).tolist())
    return sorted(picks | {0, 1, 7, 8, head - 1, head, size - 1} - {size} - {-1})


def truncated(kind: str, rel: str, at: int) -> Callable[[Path], Path]:
    def build(root: Path) -> Path:
        path = copy_of(kind, root)
        file = path / rel if rel else path
        file.write_bytes(file.read_bytes()[:at])
        return path
    return build


def flipped(kind: str, rel: str, at: int, value: int) -> Callable[[Path], Path]:
    def build(root: Path) -> Path:
        path = copy_of(kind, root)
        file = path / rel if rel else path
        raw = bytearray(file.read_bytes())
        raw[at] = value if raw[at] != value else value ^ 0x55
        file.write_bytes(bytes(raw))
        return path
    return build


def byte_cases(kind: str, fmt: str, rel: str, head: int, n_trunc: int, n_flip: int) -> list[Case]:
    """Truncations at ``n_trunc`` offsets and ``n_flip`` flipped bytes, mostly in the first
    ``head`` bytes of ``rel`` inside the ``kind`` base (the header lives there)."""
    file = base(kind) / rel if rel else base(kind)
    size = file.stat().st_size
    rng = np.random.default_rng(len(rel) + size)
    out = [Case(f"{fmt}:{rel or file.name}:truncated@{at}", fmt, truncated(kind, rel, at))
           for at in offsets(size, head, n_trunc * 3 // 4, n_trunc // 4)]
    out += [Case(f"{fmt}:{rel or file.name}:byte{at}={v}", fmt, flipped(kind, rel, at, v))
            for at, v in zip(offsets(size, head, n_flip, 4),
                             rng.choice([0, 0xFF, 0x7F, 0x80, ord("9"), ord('"'), ord("-")], 10_000))]
    return out


# safetensors -----------------------------------------------------------------------------
def st_read(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def st_write(file: Path, header: dict, data: bytes, length: int | None = None) -> None:
    raw = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def st_edit(kind: str, rel: str, edit: Callable[[dict, bytes], tuple[dict, bytes]],
            length: Callable[[int], int] | None = None) -> Callable[[Path], Path]:
    def build(root: Path) -> Path:
        path = copy_of(kind, root)
        header, data = st_read(path / rel)
        header, data = edit(header, data)
        st_write(path / rel, header, data, None if length is None else length(len(json.dumps(header))))
        return path
    return build


def first_tensors(header: dict, n: int = 2) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"),
                  key=lambda k: header[k]["data_offsets"][0])[:n]


def entry_field(field: str, value) -> Callable[[dict, bytes], tuple[dict, bytes]]:
    def edit(header: dict, data: bytes) -> tuple[dict, bytes]:
        header[first_tensors(header, 1)[0]][field] = value
        return header, data
    return edit


def header_entry_cases(kind: str, fmt: str, rel: str) -> list[Case]:
    """Declared fields of every wrong kind in a safetensors header (hf and mlx share it)."""
    size = (base(kind) / rel).stat().st_size
    fields = {
        "shape": [[2**40, 2**40], [-1, 48], [2**62, 2**62, 16], [2**64], [0, -5], ["3"], None, [1.5],
                  "x", [[1]], [True]],
        "data_offsets": [[-8, 40], [40, 0], [0, 2**64], [0, size * 4], None, [0], ["0", "48"],
                         [2**63, 2**63 + 4], [0.0, 4.0]],
        "dtype": ["F7", 7, None, "", "f32", "Q4_0", ["F32"], {"F32": 1}],
    }
    cases = [Case(f"{fmt}:{rel}:{field}={json.dumps(v)}", fmt, st_edit(kind, rel, entry_field(field, v)))
             for field, values in fields.items() for v in values]

    def overlap(header: dict, data: bytes) -> tuple[dict, bytes]:
        a, b = first_tensors(header)
        header[b]["data_offsets"] = list(header[a]["data_offsets"])
        header[b]["shape"], header[b]["dtype"] = header[a]["shape"], header[a]["dtype"]
        return header, data

    def short(header: dict, data: bytes) -> tuple[dict, bytes]:
        name = first_tensors(header, 1)[0]
        header[name]["data_offsets"][1] -= 2
        return header, data

    def not_object(header: dict, data: bytes):
        return [1, 2, 3], data

    cases += [
        Case(f"{fmt}:{rel}:overlapping", fmt, st_edit(kind, rel, overlap), expect="overlap"),
        Case(f"{fmt}:{rel}:data-length-not-shape", fmt, st_edit(kind, rel, short), expect="needs"),
        Case(f"{fmt}:{rel}:header-not-object", fmt, st_edit(kind, rel, not_object)),
        Case(f"{fmt}:{rel}:metadata-list", fmt,
             st_edit(kind, rel, lambda h, d: ({**h, "__metadata__": [1]}, d))),
        Case(f"{fmt}:{rel}:metadata-nested", fmt,
             st_edit(kind, rel, lambda h, d: ({**h, "__metadata__": {"format": {"a": [1]}}}, d))),
    ]
    for length in (0, 1, 2**63 - 1, 2**64 - 1, 10**15):
        cases.append(Case(f"{fmt}:{rel}:header-length={length}", fmt,
                          st_edit(kind, rel, lambda h, d: (h, d), length=lambda n, v=length: v)))
    cases.append(Case(f"{fmt}:{rel}:header-length=file+1", fmt,
                      st_edit(kind, rel, lambda h, d: (h, d), length=lambda n: n + len(b"") + 10**6)))
    return cases


def nonfinite(kind: str, rel: str, value: float) -> Callable[[Path], Path]:
    def build(root: Path) -> Path:
        from safetensors.numpy import load_file, save_file

        path = copy_of(kind, root)
        tensors = load_file(path / rel)
        name = "model.layers.0.mlp.down_proj.weight"
        bad = tensors[name].copy()
        bad.reshape(-1)[11] = value
        tensors[name] = bad
        save_file(tensors, path / rel, metadata={"format": "pt"})
        return path
    return build


def json_edit(kind: str, rel: str, edit: Callable) -> Callable[[Path], Path]:
    """``edit(obj) -> obj | bytes`` applied to the JSON file ``rel`` of a copy."""
    def build(root: Path) -> Path:
        path = copy_of(kind, root)
        new = edit(json.loads((path / rel).read_text()))
        (path / rel).write_bytes(new if isinstance(new, bytes) else json.dumps(new).encode())
        return path
    return build


def file_edit(kind: str, edit: Callable[[Path, Path], None]) -> Callable[[Path], Path]:
    """``edit(path, root)`` on a copy (``root``: the case's folder, outside the model)."""
    def build(root: Path) -> Path:
        path = copy_of(kind, root)
        edit(path, root)
        return path
    return build


def outside_file(root: Path, name: str, like: Path) -> Path:
    """A real file beside the model directory, a copy of ``like``: the target an escaping
    name points at (so a reader that followed it would find something)."""
    target = root / "elsewhere" / name
    target.parent.mkdir(exist_ok=True)
    shutil.copy(like, target)
    return target


def escapes(kind: str, fmt: str, index_rel: str, key: str, shard: str) -> list[Case]:
    """An index whose entries name ``../``, absolute and symlinked-outside files."""
    def repoint(value_of: Callable[[Path, Path], str]) -> Callable[[Path], Path]:
        def build(root: Path) -> Path:
            path = copy_of(kind, root)
            index = json.loads((path / index_rel).read_text())
            value = value_of(path, root)
            index[key] = {k: value for k in index[key]}
            (path / index_rel).write_text(json.dumps(index))
            return path
        return build

    def link(path: Path, root: Path) -> str:
        target = outside_file(root, shard, path / shard)
        (path / shard).unlink()
        (path / shard).symlink_to(target)
        return shard

    return [
        Case(f"{fmt}:{index_rel}:dotdot", fmt, repoint(
            lambda p, r: "../elsewhere/" + outside_file(r, shard, p / shard).name), expect="plain file name"),
        Case(f"{fmt}:{index_rel}:absolute", fmt, repoint(
            lambda p, r: str(outside_file(r, shard, p / shard))), expect="plain file name"),
        Case(f"{fmt}:{index_rel}:symlink-outside", fmt, repoint(link), expect="outside the model directory"),
        Case(f"{fmt}:{index_rel}:not-a-string", fmt, repoint(lambda p, r: 7), expect="plain file name"),
        Case(f"{fmt}:{index_rel}:missing-shard", fmt, repoint(lambda p, r: "gone.safetensors"),
             expect="which is missing"),
    ]


def hf_cases() -> list[Case]:
    cases = byte_cases("hf", "hf", "model.safetensors", 1 << 12, 48, 48)
    cases += header_entry_cases("hf", "hf", "model.safetensors")
    first_shard = sorted(base("hf-sharded").glob("model-*.safetensors"))[0].name
    cases += escapes("hf-sharded", "hf", "model.safetensors.index.json", "weight_map", first_shard)
    cases += [
        Case("hf:symlinked-weights-outside", "hf", file_edit("hf", _link_out("model.safetensors")),
             expect="outside the model directory"),
        Case("hf:config-missing", "hf", file_edit("hf", lambda p, r: (p / "config.json").unlink()),
             expect="config.json: missing"),
        Case("hf:config-not-json", "hf", json_edit("hf", "config.json", lambda c: b"{\"model_type\": "),
             expect="not valid JSON"),
        Case("hf:config-a-list", "hf", json_edit("hf", "config.json", lambda c: [c])),
        Case("hf:config-model-type-number", "hf", json_edit("hf", "config.json", lambda c: {**c, "model_type": 5}),
             target=("gguf", "q8_0")),
        Case("hf:index-not-json", "hf", json_edit("hf-sharded", "model.safetensors.index.json",
                                                  lambda c: b"\x00\xff"), expect="index"),
        Case("hf:index-weight-map-list", "hf", json_edit("hf-sharded", "model.safetensors.index.json",
                                                         lambda c: {"weight_map": [1]}), expect="weight_map"),
        Case("hf:unknown-architecture", "hf",
             json_edit("hf", "config.json", lambda c: {**c, "model_type": "nosuch",
                                                       "architectures": ["NoSuchForCausalLM"]}),
             target=("gguf", "q8_0"), expect="nosuch"),
        Case("hf:unknown-architecture-to-mlx", "hf",
             json_edit("hf", "config.json", lambda c: {**c, "model_type": "nosuch",
                                                       "architectures": ["NoSuchForCausalLM"]}),
             target=("mlx", "int4-g64"), expect="nosuch"),
        Case("hf:nan", "hf", nonfinite("hf", "model.safetensors", float("nan")), target=("hf", "f16"),
             expect="tensor model.layers.0.mlp.down_proj.weight holds NaN or Inf"),
        Case("hf:inf-to-gguf", "hf", nonfinite("hf", "model.safetensors", float("-inf")),
             target=("gguf", "q4_k_m"), expect="tensor model.layers.0.mlp.down_proj.weight holds NaN or Inf"),
        Case("hf:tokenizer-json-broken", "hf", file_edit("hf", _garbage("tokenizer.json", b'{"model": {"vocab')),
             target=("gguf", "q8_0"), expect="tokenizer.json"),
        Case("hf:tokenizer-model-garbage", "hf",
             file_edit("hf", _garbage("tokenizer.model", b"\x08\x96\x01garbage", drop="tokenizer.json")),
             target=("gguf", "q8_0"), expect="tokenizer.model"),
        Case("hf:tokenizer-config-a-list", "hf", json_edit("hf", "tokenizer_config.json", lambda c: [1, 2]),
             target=("gguf", "q8_0"), expect="tokenizer_config.json"),
        Case("hf:tokenizer-files-missing", "hf", file_edit("hf", _drop("tokenizer.json", "tokenizer.model",
                                                                       "tokenizer_config.json")),
             target=("gguf", "q8_0")),  # a GGUF without a vocabulary, with a warning (as llama.cpp allows)
    ]
    return cases


def _link_out(rel: str) -> Callable[[Path, Path], None]:
    def edit(path: Path, root: Path) -> None:
        target = outside_file(root, Path(rel).name, path / rel)
        (path / rel).unlink()
        (path / rel).symlink_to(target)
    return edit


def _garbage(rel: str, data: bytes, drop: str | None = None) -> Callable[[Path, Path], None]:
    def edit(path: Path, root: Path) -> None:
        (path / rel).write_bytes(data)
        if drop:
            (path / drop).unlink()
    return edit


def _drop(*names: str) -> Callable[[Path, Path], None]:
    def edit(path: Path, root: Path) -> None:
        for name in names:
            (path / name).unlink()
    return edit


# .bin checkpoints --------------------------------------------------------------------------
class _Evil:
    """Pickles as "call Path.touch(MARKER)": harmless, and visible if it ever runs."""

    def __init__(self, where: Path):
        self.where = where

    def __reduce__(self):
        return (Path.touch, (self.where,))


def bin_cases() -> list[Case]:
    pytest.importorskip("torch")

    def saved(obj_of: Callable[[Path, Path], object], legacy: bool = False) -> Callable[[Path], Path]:
        def build(root: Path) -> Path:
            import pickle

            import torch

            path = copy_of("bin", root)
            obj = obj_of(path, root)
            if legacy:
                (path / "pytorch_model.bin").write_bytes(pickle.dumps(obj))
            else:
                torch.save(obj, path / "pytorch_model.bin")
            return path
        return build

    def state(path: Path) -> dict:
        import torch

        return torch.load(path / "pytorch_model.bin", weights_only=True)

    cases = byte_cases("bin", "hf", "pytorch_model.bin", 1 << 10, 24, 16)
    cases += [
        Case("hf:bin:pickle-runs-code", "hf", saved(lambda p, r: {"w": _Evil(r / MARKER)}),
             expect="cannot read checkpoint"),
        Case("hf:bin:legacy-pickle-runs-code", "hf", saved(lambda p, r: {"w": _Evil(r / MARKER)}, legacy=True),
             expect="cannot read checkpoint"),
        Case("hf:bin:top-level-pickle-runs-code", "hf", saved(lambda p, r: _Evil(r / MARKER)),
             expect="cannot read checkpoint"),
        Case("hf:bin:a-list", "hf", saved(lambda p, r: [1, 2]), expect="not a state dict"),
        Case("hf:bin:strings-and-tensors", "hf", saved(lambda p, r: {**state(p), "note": "hi", "n": 3})),
        Case("hf:bin:nan", "hf", saved(lambda p, r: _nan_state(state(p))), target=("hf", "f16"),
             expect="tensor model.layers.0.mlp.down_proj.weight holds NaN or Inf"),
        Case("hf:bin:empty-file", "hf", file_edit("bin", lambda p, r: (p / "pytorch_model.bin").write_bytes(b"")),
             expect="cannot read checkpoint"),
    ]
    return cases


def _nan_state(state: dict) -> dict:
    state["model.layers.0.mlp.down_proj.weight"].view(-1)[5] = float("nan")
    return state


# gguf ------------------------------------------------------------------------------------------
def gguf_patch(kind: str, rel: str, patch: Callable) -> Callable[[Path], Path]:
    """``patch(reader)`` on a writable gguf-py reader of the copy's ``rel``."""
    def build(root: Path) -> Path:
        import gguf

        path = copy_of(kind, root)
        file = path / rel if rel else path
        reader = gguf.GGUFReader(file, "r+")
        patch(reader)
        reader.data.flush()
        del reader
        return path if not rel else file
    return build


def set_part(getter: Callable, index: int, value: int) -> Callable:
    def patch(reader) -> None:
        part = getter(reader).parts[index]
        part[0] = np.array(value).astype(part.dtype) if value >= 0 else np.array(value, np.int64).view(np.uint64).astype(part.dtype)
    return patch


def tensor_field(i: int) -> Callable:
    return lambda reader: reader.tensors[i].field


def kv_field(key: str) -> Callable:
    return lambda reader: reader.fields[key]


def gguf_header_end(file: Path) -> int:
    import gguf

    return int(gguf.GGUFReader(file).data_offset)


def gguf_cases() -> list[Case]:
    pytest.importorskip("conv_gguf")
    file = base("gguf")
    head = gguf_header_end(file)
    cases = byte_cases("gguf", "gguf", "", head, 40, 40)
    # tensor info parts: [name length, name, n_dims, dims, type, offset]
    huge = [2**62, 2**63 - 1, 2**64 - 1, 2**31, 0]
    for value in huge:
        cases.append(Case(f"gguf:tensor-count={value}", "gguf", _raw_u64(8, value)))
        cases.append(Case(f"gguf:kv-count={value}", "gguf", _raw_u64(16, value)))
        cases.append(Case(f"gguf:tensor1-dim0={value}", "gguf", gguf_patch("gguf", "", set_part(tensor_field(1), 3, value))))
        cases.append(Case(f"gguf:tensor1-offset={value}", "gguf", gguf_patch("gguf", "", set_part(tensor_field(1), 5, value))))
        cases.append(Case(f"gguf:tensor1-name-length={value}", "gguf", gguf_patch("gguf", "", set_part(tensor_field(1), 0, value))))
        cases.append(Case(f"gguf:tokens-count={value}", "gguf", gguf_patch("gguf", "", set_part(kv_field("tokenizer.ggml.tokens"), 4, value))))
        cases.append(Case(f"gguf:arch-string-length={value}", "gguf", gguf_patch("gguf", "", set_part(kv_field("general.architecture"), 1, value))))
    for n_dims in (0, 5, 2**31, 2**32 - 1):
        cases.append(Case(f"gguf:tensor1-n-dims={n_dims}", "gguf", gguf_patch("gguf", "", set_part(tensor_field(1), 2, n_dims))))
    for gtype in (4, 5, 99, 1000, 2**32 - 1):  # 4/5: the removed Q4_2/Q4_3
        cases.append(Case(f"gguf:tensor1-type={gtype}", "gguf", gguf_patch("gguf", "", set_part(tensor_field(1), 4, gtype))))
    for vtype in (13, 99, 2**32 - 1):
        cases.append(Case(f"gguf:kv-value-type={vtype}", "gguf", gguf_patch("gguf", "", set_part(kv_field("general.architecture"), 2, vtype))))
    cases += [
        Case("gguf:tensor-overlaps-previous", "gguf", gguf_patch("gguf", "", _overlap), expect="overlap"),
        Case("gguf:tensor-offset-misaligned", "gguf", gguf_patch("gguf", "", _misalign)),
        # an architecture the reader cannot map still loads (inspect shows it); converting
        # it fails naming the architecture
        Case("gguf:unknown-architecture", "gguf", gguf_patch("gguf", "", _string("general.architecture", "zzzzz")),
             target=("hf", None), expect="'zzzzz'"),
        Case("gguf:unknown-tokenizer-model", "gguf", gguf_patch("gguf", "", _string("tokenizer.ggml.model", "zzzzz")),
             target=("hf", None)),  # read without a tokenizer, with a warning
        Case("gguf:nan", "gguf", _gguf_nan(), target=("hf", "f16"), expect="holds NaN or Inf"),
    ]
    return cases


def _raw_u64(at: int, value: int) -> Callable[[Path], Path]:
    def build(root: Path) -> Path:
        path = copy_of("gguf", root)
        raw = bytearray(path.read_bytes())
        raw[at:at + 8] = struct.pack("<Q", value)
        path.write_bytes(bytes(raw))
        return path
    return build


def _overlap(reader) -> None:
    a, b = reader.tensors[1].field, reader.tensors[2].field
    b.parts[5][0] = a.parts[5][0]


def _misalign(reader) -> None:
    reader.tensors[1].field.parts[5][0] += 1


def _string(key: str, value: str) -> Callable:
    def patch(reader) -> None:
        part = reader.fields[key].parts[-1]
        assert len(part) == len(value), (key, bytes(part))
        part[:] = np.frombuffer(value.encode(), np.uint8)
    return patch


def _gguf_nan() -> Callable[[Path], Path]:
    """An f32 norm weight holding NaN (q8_0 files keep norms in f32)."""
    def patch(reader) -> None:
        t = next(t for t in reader.tensors if t.name == "blk.0.ffn_norm.weight")
        t.data[3] = np.nan
    return gguf_patch("gguf", "", patch)


def gguf_split_cases() -> list[Case]:
    pytest.importorskip("conv_gguf")
    parts = sorted(p.name for p in base("gguf-split").glob("*.gguf"))
    assert len(parts) >= 3, parts
    first, second = parts[0], parts[1]

    def in_split(edit: Callable[[Path], None]) -> Callable[[Path], Path]:
        def build(root: Path) -> Path:
            path = copy_of("gguf-split", root)
            edit(path)
            return path / first
        return build

    head = gguf_header_end(base("gguf-split") / second)
    cases = [Case(c.id.replace("gguf:", "gguf-split:"), "gguf", _first_part(c.build, first))
             for c in byte_cases("gguf-split", "gguf", second, head, 16, 16)]
    cases += [
        Case("gguf-split:missing-part", "gguf", in_split(lambda p: (p / second).unlink()), expect="missing shard"),
        Case("gguf-split:part-is-a-directory", "gguf",
             in_split(lambda p: ((p / second).unlink(), (p / second).mkdir())), expect=second),
        Case("gguf-split:part-links-outside", "gguf", _split_link_out(first, second),
             expect="outside the model directory"),
    ]
    for key, value in (("split.count", 9), ("split.count", 2**16 - 1), ("split.no", 7),
                       ("split.tensors.count", 2**31)):
        for which in (first, second):
            cases.append(Case(f"gguf-split:{which}:{key}={value}", "gguf",
                              _first_part(gguf_patch("gguf-split", which, set_part(kv_field(key), -1, value)), first)))
    return cases


def _first_part(build: Callable[[Path], Path], first: str) -> Callable[[Path], Path]:
    def wrapped(root: Path) -> Path:
        out = build(root)
        folder = out if out.is_dir() else out.parent
        return folder / first
    return wrapped


def _split_link_out(first: str, second: str) -> Callable[[Path], Path]:
    def build(root: Path) -> Path:
        path = copy_of("gguf-split", root)
        target = outside_file(root, second, path / second)
        (path / second).unlink()
        (path / second).symlink_to(target)
        return path / first
    return build


# mlx -----------------------------------------------------------------------------------------------
def mlx_cases() -> list[Case]:
    weights = sorted(p.name for p in base("mlx").glob("*.safetensors"))
    rel = weights[0]
    cases = byte_cases("mlx", "mlx", rel, 1 << 12, 24, 24)
    cases += byte_cases("mlx", "mlx", "config.json", 1 << 12, 8, 16)
    cases += header_entry_cases("mlx", "mlx", rel)
    for bits, group in ((7, 64), (0, 64), (-4, 64), (4, 0), (4, -64), (4, 2**40), ("4", "x"), (None, 64), (2**70, 64)):
        cases.append(Case(f"mlx:quantization=bits {bits} group {group}", "mlx",
                          json_edit("mlx", "config.json", lambda c, b=bits, g=group:
                                    {**c, "quantization": {"bits": b, "group_size": g}})))
    cases += [
        Case("mlx:quantization-a-list", "mlx", json_edit("mlx", "config.json", lambda c: {**c, "quantization": [4]})),
        Case("mlx:quantization-mode-unknown", "mlx", json_edit("mlx", "config.json", lambda c: {
            **c, "quantization": {**c["quantization"], "mode": "nf4"}}), expect="nf4"),
        Case("mlx:quantization-removed", "mlx", json_edit("mlx", "config.json", lambda c: {
            k: v for k, v in c.items() if not k.startswith("quantization")}), expect="no quantization block"),
        Case("mlx:scales-wrong-width", "mlx", _mlx_tensors(rel, _narrow_scales), expect="scales"),
        Case("mlx:weight-not-u32", "mlx", _mlx_tensors(rel, _weight_u8), expect="expected u32"),
        Case("mlx:biases-missing", "mlx", _mlx_tensors(rel, _no_biases), expect="biases missing"),
        Case("mlx:symlinked-weights-outside", "mlx", file_edit("mlx", _link_out(rel)),
             expect="outside the model directory"),
        Case("mlx:config-missing", "mlx", file_edit("mlx", lambda p, r: (p / "config.json").unlink()),
             expect="config.json: missing"),
    ]
    if len(weights) > 1:
        cases += escapes("mlx", "mlx", "model.safetensors.index.json", "weight_map", rel)
    else:  # the tiny model is one shard: give it an index to attack
        cases += [Case(c.id, c.fmt, _with_index(c.build, rel), c.expect)
                  for c in escapes("mlx-indexed", "mlx", "model.safetensors.index.json", "weight_map", rel)]
    return cases


def _with_index(build: Callable[[Path], Path], rel: str) -> Callable[[Path], Path]:
    if "mlx-indexed" not in _BASES:
        import tempfile

        from safetensors import safe_open

        folder = Path(tempfile.mkdtemp(prefix="corpus-mlx-indexed-")) / "m"
        shutil.copytree(base("mlx"), folder)
        with safe_open(folder / rel, "np") as f:
            names = list(f.keys())
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {n: rel for n in names}}))
        _BASES["mlx-indexed"] = folder
    return build


def _mlx_tensors(rel: str, edit: Callable[[dict], None]) -> Callable[[Path], Path]:
    def build(root: Path) -> Path:
        from safetensors.numpy import load_file, save_file

        path = copy_of("mlx", root)
        tensors = load_file(path / rel)
        edit(tensors)
        save_file(tensors, path / rel, metadata={"format": "mlx"})
        return path
    return build


def _quantized_stem(tensors: dict) -> str:
    return sorted(k[:-len(".scales")] for k in tensors if k.endswith(".scales"))[0]


def _narrow_scales(tensors: dict) -> None:
    stem = _quantized_stem(tensors)
    tensors[f"{stem}.scales"] = np.ascontiguousarray(tensors[f"{stem}.scales"][:, :-1])
    tensors[f"{stem}.biases"] = np.ascontiguousarray(tensors[f"{stem}.biases"][:, :-1])


def _weight_u8(tensors: dict) -> None:
    stem = _quantized_stem(tensors)
    tensors[f"{stem}.weight"] = tensors[f"{stem}.weight"].view(np.uint8)


def _no_biases(tensors: dict) -> None:
    del tensors[f"{_quantized_stem(tensors)}.biases"]


# npz -----------------------------------------------------------------------------------------------
def npz_cases() -> list[Case]:
    folder = base("npz")
    manifest = next(folder.glob("*_manifest_q*.json")).name
    npz = next(folder.glob("*_quantized_q*.npz")).name
    cases = byte_cases("npz", "npz", npz, 1 << 12, 24, 24)
    cases += byte_cases("npz", "npz", manifest, 1 << 12, 8, 16)

    def weight0(key: str, value) -> Callable:
        def edit(m: dict) -> dict:
            m["weights"][0][key] = value
            return m
        return edit

    for key, values in (("shape", [[2**40, 2**40], [-1, 4], [2**64], "x", None, [1.5]]),
                        ("bits", [3, 0, 99, "8", None]), ("name", [None, 7, "", "../../x"])):
        for v in values:
            cases.append(Case(f"npz:manifest-weight-{key}={json.dumps(v)}", "npz",
                              json_edit("npz", manifest, weight0(key, v))))
    for name, value in (("dotdot", "../elsewhere/x.npz"), ("absolute", "/etc/passwd"), ("number", 5)):
        cases.append(Case(f"npz:manifest-file-{name}", "npz",
                          json_edit("npz", manifest, lambda m, v=value: {**m, "file": v}),
                          expect="missing or not a plain name"))
    cases += [
        Case("npz:manifest-weights-not-list", "npz", json_edit("npz", manifest, lambda m: {**m, "weights": {}}),
             expect="no weights list"),
        Case("npz:manifest-duplicate-weight", "npz",
             json_edit("npz", manifest, lambda m: {**m, "weights": m["weights"] + m["weights"][:1]})),
        Case("npz:npz-links-outside", "npz", file_edit("npz", _link_out(npz)), expect="outside the model directory"),
        Case("npz:member-pickle-runs-code", "npz", _npz_member(npz, "pickle"), expect="object"),
        Case("npz:member-header-huge-shape", "npz", _npz_member(npz, "huge")),
        Case("npz:member-header-negative-shape", "npz", _npz_member(npz, "negative")),
        Case("npz:member-wrong-shape", "npz", _npz_member(npz, "shape")),
        Case("npz:member-missing", "npz", _npz_member(npz, "drop")),
    ]
    return cases


def _npz_member(npz: str, how: str) -> Callable[[Path], Path]:
    """Rewrite the npz with its first member replaced (or dropped)."""
    def build(root: Path) -> Path:
        import io
        import zipfile

        path = copy_of("npz", root)
        with zipfile.ZipFile(path / npz) as z:
            members = {n: z.read(n) for n in z.namelist()}
        victim = sorted(members)[0]
        if how == "drop":
            del members[victim]
        elif how == "pickle":
            buf = io.BytesIO()
            np.save(buf, np.array([_Evil(root / MARKER)], dtype=object), allow_pickle=True)
            members[victim] = buf.getvalue()
        elif how == "shape":
            buf = io.BytesIO()
            np.save(buf, np.zeros((3, 5), np.int8))
            members[victim] = buf.getvalue()
        else:
            shape = "(1099511627776, 1099511627776)" if how == "huge" else "(-4, 16)"
            header = "{'descr': '|i1', 'fortran_order': False, 'shape': %s, }" % shape
            header = header.ljust(118) + "\n"
            members[victim] = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\0" * 64
        with zipfile.ZipFile(path / npz, "w") as z:
            for n, data in members.items():
                z.writestr(n, data)
        return path
    return build


# onnx ----------------------------------------------------------------------------------------------
def onnx_cases() -> list[Case]:
    folder = base("onnx")
    graph = "model.onnx"
    data = sorted(p.name for p in folder.iterdir() if p.name.endswith((".data", ".onnx_data")))
    cases = byte_cases("onnx", "onnx", graph, 1 << 14, 32, 32)
    if data:
        cases += byte_cases("onnx", "onnx", data[0], 1 << 10, 4, 4)
        for key, value, expect in (("location", "../elsewhere/w.data", "outside the model directory"),
                                   ("location", "/etc/passwd", "outside the model directory"),
                                   ("location", "", "outside the model directory"),
                                   ("location", "nosuch.data", "missing"),
                                   ("offset", str(2**62), None), ("offset", "-5", None), ("offset", "x", None),
                                   ("length", str(2**62), None), ("length", "-1", None), ("length", "0", None)):
            cases.append(Case(f"onnx:external-{key}={value!r}", "onnx", _onnx_external(key, value, data[0]), expect))
        cases.append(Case("onnx:external-data-links-outside", "onnx", file_edit("onnx", _link_out(data[0])),
                          expect="outside the model directory"))
    for field, value in (("data_type", 99), ("data_type", 0), ("dims", [-1, 8]), ("dims", [2**40, 2**40]),
                         ("raw_data", b"\x01\x02\x03")):
        cases.append(Case(f"onnx:initializer-{field}={value!r}", "onnx", _onnx_init(field, value)))
    cases += [
        Case("onnx:tensors-metadata-not-json", "onnx", _onnx_meta("{"), expect="not JSON"),
        Case("onnx:tensors-metadata-a-list", "onnx", _onnx_meta("[1]")),
        Case("onnx:tensors-metadata-names-missing-initializer", "onnx", _onnx_meta_edit(_rename_first_entry)),
    ]
    return cases


def _onnx_model(edit: Callable) -> Callable[[Path], Path]:
    def build(root: Path) -> Path:
        import onnx

        path = copy_of("onnx", root)
        model = onnx.load(str(path / "model.onnx"), load_external_data=False)
        edit(model, path, root)
        (path / "model.onnx").write_bytes(model.SerializeToString())
        return path
    return build


def _big_external(model):
    from onnx import TensorProto

    return max((t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL),
               key=lambda t: int({e.key: e.value for e in t.external_data}.get("length", 0)))


def _onnx_external(key: str, value: str, data_name: str) -> Callable[[Path], Path]:
    def edit(model, path: Path, root: Path) -> None:
        if key == "location" and value.startswith("../"):
            outside_file(root, "w.data", path / data_name)
        t = _big_external(model)
        for e in t.external_data:
            if e.key == key:
                e.value = value
                return
        t.external_data.add(key=key, value=value)
    return _onnx_model(edit)


def _onnx_init(field: str, value) -> Callable[[Path], Path]:
    def edit(model, path: Path, root: Path) -> None:
        from onnx import TensorProto

        inline = [t for t in model.graph.initializer if t.data_location != TensorProto.EXTERNAL and t.dims]
        t = inline[0] if inline else model.graph.initializer[0]
        if field == "dims":
            del t.dims[:]
            t.dims.extend(value)
        elif field == "raw_data":
            t.raw_data = value
        else:
            setattr(t, field, value)
    return _onnx_model(edit)


def _onnx_meta(text: str) -> Callable[[Path], Path]:
    def edit(model, path: Path, root: Path) -> None:
        for p in model.metadata_props:
            if p.key == "convcore.tensors":
                p.value = text
    return _onnx_model(edit)


def _onnx_meta_edit(change: Callable[[dict], dict]) -> Callable[[Path], Path]:
    def edit(model, path: Path, root: Path) -> None:
        for p in model.metadata_props:
            if p.key == "convcore.tensors":
                p.value = json.dumps(change(json.loads(p.value)))
    return _onnx_model(edit)


def _rename_first_entry(meta):
    entries = meta if isinstance(meta, dict) else {}
    first = next(iter(entries))
    value = entries[first]
    if isinstance(value, dict) and "initializer" in value:
        value["initializer"] = "no_such_initializer"
    return meta


# parquet -------------------------------------------------------------------------------------------
def parquet_cases() -> list[Case]:
    cases = []
    for kind in ("parquet-v1", "parquet"):
        file = base(kind)
        size = file.stat().st_size
        # the footer (schema, row groups) is at the end: aim truncations and flips there
        tail = [size - k for k in (1, 4, 8, 12, 64, 512, 4096, 32768) if k < size]
        cases += [Case(f"{kind}:truncated@{at}", "parquet", truncated(kind, "", at))
                  for at in sorted(set(offsets(size, 1 << 10, 12, 12) + tail))]
        rng = np.random.default_rng(size)
        cases += [Case(f"{kind}:byte{at}", "parquet", flipped(kind, "", at, int(v)))
                  for at, v in zip(sorted(set(np.linspace(max(0, size - 4096), size - 1, 24).astype(int).tolist()
                                               + offsets(size, 1 << 10, 8, 8))),
                                   rng.integers(0, 256, 10_000))]
    for kind in ("parquet-v1", "parquet"):
        for column, row, value in (("shape", 1, [-4, 8]), ("shape", 1, [2**40, 2**40]), ("shape", 1, [2**62, 4]),
                                   ("shape", 1, []), ("dtype", 1, "f7"), ("layer_name", 2, None),
                                   ("num_params", 1, -1), ("num_params", 1, 2**62)):
            cases.append(Case(f"{kind}:{column}[{row}]={value!r}", "parquet", _pq_edit(kind, column, row, value)))
        cases.append(Case(f"{kind}:duplicate-name", "parquet", _pq_edit(kind, "layer_name", 3, "@1"),
                          expect="appears twice"))
        cases.append(Case(f"{kind}:data-short", "parquet", _pq_edit(kind, "data", 2, "@short")))
    for column, value in (("scales", "@short"), ("quant_axis", 5), ("group_size", 0), ("group_size", -64),
                          ("group_size", 2**40), ("quant_type", "int3-row"), ("zero_points", "@short")):
        cases.append(Case(f"parquet:v2-{column}={value!r}", "parquet", _pq_edit("parquet", column, "@quantized", value)))
    cases.append(Case("parquet:config-metadata-not-json", "parquet", _pq_config(b"{")))
    return cases


def _pq_edit(kind: str, column: str, row, value) -> Callable[[Path], Path]:
    def build(root: Path) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = copy_of(kind, root)
        table = pq.read_table(path)
        cols = table.to_pydict()
        if column not in cols:
            return path
        i = row
        if row == "@quantized":
            i = next(k for k, q in enumerate(cols["quant_type"]) if q and q != "none")
        if value == "@1":
            cols[column][i] = cols[column][1]
        elif value == "@short":
            cols[column][i] = (cols[column][i] or b"")[:-4]
        else:
            cols[column][i] = value
        try:
            pq.write_table(pa.table(cols, schema=table.schema), path, row_group_size=1)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError):
            # a value the declared schema cannot hold: a table of inferred types, as
            # another tool might write it
            new = pa.table({k: pa.array(v) for k, v in cols.items()})
            pq.write_table(new.replace_schema_metadata(table.schema.metadata), path, row_group_size=1)
        return path
    return build


def _pq_config(raw: bytes) -> Callable[[Path], Path]:
    def build(root: Path) -> Path:
        import pyarrow.parquet as pq

        path = copy_of("parquet", root)
        table = pq.read_table(path)
        meta = dict(table.schema.metadata or {})
        key = next((k for k in meta if b"config" in k), b"config.json")
        meta[key] = raw
        pq.write_table(table.replace_schema_metadata(meta), path, row_group_size=1)
        return path
    return build


# running the corpus ----------------------------------------------------------------------------
LOADERS: dict[str, Callable[[], list[Case]]] = {
    "hf": hf_cases, "hf-bin": bin_cases, "gguf": gguf_cases, "gguf-split": gguf_split_cases,
    "mlx": mlx_cases, "npz": npz_cases, "onnx": onnx_cases, "parquet": parquet_cases,
}
_FORMAT_OF = {"hf": "hf", "hf-bin": "hf", "gguf": "gguf", "gguf-split": "gguf", "mlx": "mlx",
              "npz": "npz", "onnx": "onnx", "parquet": "parquet"}


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def load_all(path: Path, fmt: str) -> tuple[str | None, int]:
    """(error or None, peak bytes traced) of loading ``path`` and reading every tensor."""
    tracemalloc.start()
    try:
        model = convcore.get_registry().load(path, fmt)
        for ref in model.tensors.values():
            ref.load()
        error = None
    except convcore.ConvcoreError as exc:
        error = str(exc)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return error, peak


#: well-formed files that loading refuses for a reason of its own (the gguf reader reads
#: back only the architectures it can map to HF); validate passes them
LOADER_ONLY = {"gguf:unknown-architecture"}


def validate_agrees(case: Case, path: Path, root: Path) -> list[str]:
    """``validate`` finds a problem with every file whose model (its headers, as
    ``load`` reads them, not its tensor values) loading refuses, and reports it in
    one-line problems without raising."""
    registry = convcore.get_registry()
    try:
        registry.load(path, case.fmt)
        return []
    except convcore.ConvcoreError:
        pass
    try:
        found = registry.validate(path, case.fmt)
    except convcore.ConvcoreError as exc:
        found = [str(exc)]
    except Exception as exc:  # noqa: BLE001 - the finding itself
        return [f"{case.id}: validate raised {type(exc).__name__}: {exc}"[:400]]
    if case.id in LOADER_ONLY:
        return [f"{case.id}: validate found {found!r} in a file it should pass"[:400]] if found else []
    if not found:
        return [f"{case.id}: loading refuses it, validate passes it"]
    return [f"{case.id}: validate problem spans lines: {p!r}"[:400] for p in found if "\n" in p.strip()]


def check(case: Case, folder: Path) -> list[str]:
    """What is wrong with how the loader met ``case`` (empty when all is well)."""
    problems = []
    root = folder / "case"
    root.mkdir()
    path = case.build(root)
    before = tree_digest(root)
    try:
        error, peak = load_all(path, case.fmt)
    except Exception as exc:  # noqa: BLE001 - the finding itself
        return [f"{case.id}: {type(exc).__name__}: {exc}"[:400]]
    largest = max(_size(base_path) for base_path in (path, root))
    if peak > 64 * 2**20 + 4 * largest:
        problems.append(f"{case.id}: {peak / 2**20:.0f} MB allocated for {largest / 2**20:.1f} MB of input")
    if error is not None:
        if "\n" in error.strip():
            problems.append(f"{case.id}: error spans lines: {error!r}"[:400])
        if str(root) not in error:
            problems.append(f"{case.id}: error names no file of the case: {error!r}"[:400])
    problems += validate_agrees(case, path, root)
    if case.target and error is None:
        to, quant = case.target
        out = folder / "out"
        out.mkdir()
        dst = out / ("m.gguf" if to == "gguf" else "m.parquet" if to == "parquet" else "m")
        try:
            convcore.convert(path, dst, to=to, quant=quant, from_=case.fmt)
            error = None
        except convcore.ConvcoreError as exc:
            error = str(exc)
            if list(out.iterdir()):
                problems.append(f"{case.id}: output left behind: {sorted(p.name for p in out.iterdir())}")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{case.id}: converting: {type(exc).__name__}: {exc}"[:400])
            error = ""
        if error and "\n" in error.strip():
            problems.append(f"{case.id}: error spans lines: {error!r}"[:400])
    if case.expect is not None and (error is None or case.expect not in error):
        problems.append(f"{case.id}: expected an error with {case.expect!r}, got {error!r}"[:400])
    if (root / MARKER).exists():
        problems.append(f"{case.id}: a pickle ran code")
    if tree_digest(root) != before:
        problems.append(f"{case.id}: the input changed")
    return problems


@pytest.mark.parametrize("every", [3, pytest.param(1, marks=pytest.mark.full)], ids=["sample", "all"])
@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_corpus(loader, every, tmp_path):
    """Every loader's hostile corpus: a third of each (every third case) in the default
    tier, all of it in make test-full."""
    cases = LOADERS[loader]()
    assert len({c.id for c in cases}) == len(cases), "case ids repeat"
    cases = cases[::every]
    problems: list[str] = []
    for i, case in enumerate(cases):
        folder = tmp_path / str(i)
        folder.mkdir()
        problems += check(case, folder)
        shutil.rmtree(folder, ignore_errors=True)
    assert not problems, f"{len(problems)} of {len(cases)} {loader} cases:\n" + "\n".join(problems)


def test_reliability_doc_quotes_the_corpus_sizes():
    """docs/reliability.md states each loader's case count; keep it true."""
    text = (ROOT / "docs" / "reliability.md").read_text()
    for loader, cases in LOADERS.items():
        try:
            n = len(cases())
        except pytest.skip.Exception:
            continue
        m = re.search(rf"\| `{re.escape(loader)}` \| (\d+) \|", text)
        assert m, f"docs/reliability.md has no corpus row for {loader}"
        assert int(m.group(1)) == n, f"docs/reliability.md says {m.group(1)} {loader} cases; the corpus has {n}"

