"""ONNX directory -> :class:`convcore.Model` with HF names.

Only ``model.onnx``'s protobuf is parsed at load (weights stay in the external data
file, memory-mapped on demand). The ``convcore.tensors`` metadata both writers leave
says where each HF tensor lives: an initializer, maybe transposed, maybe a row range of
a fused matrix, maybe MatMulNBits blocks (dequantized on load). A graph without it
(another tool's) is read by initializer names.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx
from onnx import TensorProto

from convcore import (
    ConvcoreError, Model, TensorRef, arch_of, cast, cast_chunks, get_registry, numpy_dtype, page_releaser,
    read_companions, read_json, read_tokenizer_files, row_block_loaders,
)
from convcore import rowblocks

from . import genai_read
from .archs import BUILDER_ARCHS


DTYPE_OF = {TensorProto.FLOAT: "f32", TensorProto.FLOAT16: "f16", TensorProto.BFLOAT16: "bf16",
            TensorProto.DOUBLE: "f64", TensorProto.UINT8: "u8", TensorProto.INT8: "i8",
            TensorProto.INT32: "i32", TensorProto.INT64: "i64", TensorProto.INT16: "i16",
            TensorProto.UINT16: "u16", TensorProto.UINT32: "u32", TensorProto.UINT64: "u64",
            TensorProto.BOOL: "bool"}


def model_file(path: Path) -> Path:
    path = Path(path)
    return path / "model.onnx" if path.is_dir() else path


def parse_model(file: Path) -> onnx.ModelProto:
    """The graph without external data, or a one-line error naming the file."""
    if not file.is_file():
        raise ConvcoreError(f"{file}: no such ONNX file")
    try:
        model = onnx.load(str(file), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ConvcoreError(f"{file}: not a readable ONNX model "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'truncated?'})") from None
    if not model.graph.node and not model.graph.initializer:
        raise ConvcoreError(f"{file}: not a readable ONNX model (empty or truncated graph)")
    return model


class Initializers:
    """Initializers by name, read lazily: inline ones from the proto, external ones through
    a memory map of their file, after checking location, offset and length."""

    def __init__(self, file: Path, model: onnx.ModelProto):
        self.file = file
        self.root = file.parent.resolve()
        self.protos = {t.name: t for t in model.graph.initializer}

    def dtype(self, name: str) -> str:
        t = self.protos[name]
        if t.data_type not in DTYPE_OF:
            raise ConvcoreError(f"{self.file}: initializer {name!r} has unsupported type {t.data_type}")
        return DTYPE_OF[t.data_type]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.protos[name].dims)

    def external(self, name: str) -> tuple[Path, int, int] | None:
        """(file, offset, length) of an external initializer, checked; None when inline."""
        t = self.protos[name]
        if t.data_location != TensorProto.EXTERNAL:
            return None
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        target = (self.root / location).resolve()
        if not location or os.path.isabs(location) or not target.is_relative_to(self.root):
            raise ConvcoreError(f"{self.file}: initializer {name!r}: external data location "
                                f"{location!r} is outside the model directory")
        if not target.is_file():
            raise ConvcoreError(f"{self.file}: initializer {name!r}: external data file {location} is missing")
        expected = int(np.prod(self.shape(name), dtype=np.int64)) * numpy_dtype(self.dtype(name)).itemsize
        try:
            offset = int(info.get("offset", 0) or 0)
            length = int(info.get("length", expected) or expected)
        except ValueError:
            raise ConvcoreError(f"{self.file}: initializer {name!r}: external offset "
                                f"{info.get('offset')!r} / length {info.get('length')!r} are not integers") from None
        if offset < 0:
            raise ConvcoreError(f"{self.file}: initializer {name!r}: negative external offset {offset}")
        if length != expected:
            raise ConvcoreError(f"{self.file}: initializer {name!r}: external length {length} bytes, "
                                f"its shape {list(self.shape(name))} needs {expected}")
        size = target.stat().st_size
        if offset + length > size:
            raise ConvcoreError(f"{target}: too short: initializer {name!r} needs bytes up to "
                                f"{offset + length}, the file has {size}")
        return target, offset, length

    def check_all(self) -> None:
        for name in self.protos:
            self.dtype(name)
            self.external(name)

    def read(self, name: str) -> np.ndarray:
        dtype = numpy_dtype(self.dtype(name))
        shape = self.shape(name)
        ext = self.external(name)
        if ext is None:
            array = onnx.numpy_helper.to_array(self.protos[name])
            return array.astype(dtype, copy=False).reshape(shape)
        target, offset, length = ext
        if not length:
            return np.zeros(shape, dtype)
        # a fresh map per read: its pages leave with the array, so resident memory follows
        # the tensors in flight, not the part of the data file read so far
        raw = np.memmap(target, dtype=np.uint8, mode="r", offset=offset, shape=(length,))
        return raw.view(dtype).reshape(shape)


def _plain_loader(inits: Initializers, entry: dict[str, Any]) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        array = inits.read(entry["init"])
        if entry.get("transpose"):
            array = array.T
        if "rows" in entry:
            array = array[entry["rows"][0]:entry["rows"][1]]
        return np.ascontiguousarray(array)
    return load


def _quant_loader(inits: Initializers, entry: dict[str, Any]
                  ) -> tuple[Callable[[], np.ndarray], Callable[[str], Iterator[np.ndarray]]]:
    """(load, chunk_loader) of a MatMulNBits tensor, dequantized a block of rows at a time
    (a whole float32 lm_head would be 262 MB for a 32k x 2048 model)."""
    n, k = entry["shape"]
    first, last = entry.get("rows") or [0, n]
    held: dict[str, Any] = {}

    def prepare() -> None:
        scheme = get_registry().schemes.get(entry["scheme"])
        if scheme is None:
            raise ConvcoreError(f"{inits.file}: scheme {entry['scheme']} is not installed "
                                "(pip install quant-rowwise)")
        # every MatMulNBits array is indexed by output row first: dequantize only this
        # tensor's rows of a fused matrix (q/k/v), not the whole matrix once per part
        held["scheme"] = scheme
        held["q"] = inits.read(entry["init"])
        held["scales"] = inits.read(entry["scales"]).reshape(n, -1)
        held["zps"] = inits.read(entry["zero_points"]).reshape(n, -1) if entry.get("zero_points") else None
        held["release"] = [(page_releaser(held[key]), held[key]) for key in ("q", "scales", "zps")
                           if held[key] is not None]

    def rows(a: int, z: int) -> np.ndarray:
        a, z = first + a, first + z
        data = {"q": held["q"][a:z], "scales": np.asarray(held["scales"][a:z], dtype=np.float32)}
        if held["zps"] is not None:
            data["zero_points"] = held["zps"][a:z]
        out = np.ascontiguousarray(held["scheme"].dequantize(data, (z - a, k)), dtype=np.float32)
        for release, array in held["release"]:  # the mapped rows done leave the resident set
            release(array[a:z])
        return out

    return row_block_loaders((last - first, k), rows, "f32", prepare)


def _ref(inits: Initializers, hf: str, entry: dict[str, Any]) -> TensorRef:
    if "concat" in entry:
        return _joined(hf, [_ref(inits, hf, part) for part in entry["concat"]])
    if "add" in entry:
        return _shifted(_ref(inits, hf, {k: v for k, v in entry.items() if k != "add"}), float(entry["add"]))
    name = entry.get("init", "")
    if name not in inits.protos:
        raise ConvcoreError(f"{inits.file}: convcore.tensors names initializer {name!r} for {hf}, "
                            "which the graph does not have")
    if entry.get("scheme"):
        for key in ("scales", "zero_points"):
            if entry.get(key) and entry[key] not in inits.protos:
                raise ConvcoreError(f"{inits.file}: {hf}: initializer {entry[key]!r} is missing")
        n, k = entry["shape"]
        rows = entry.get("rows") or [0, n]
        shape = (rows[1] - rows[0], k)
        packed = sum(int(np.prod(inits.shape(entry[p]))) * numpy_dtype(inits.dtype(entry[p])).itemsize
                     for p in ("init", "scales", "zero_points") if entry.get(p))
        load, pieces = _quant_loader(inits, entry)
        return TensorRef(hf, shape, "f32", load, source=str(inits.file), stored=entry["scheme"],
                         stored_nbytes=packed * (rows[1] - rows[0]) // max(n, 1), chunk_loader=pieces)
    shape = inits.shape(name)
    if entry.get("transpose"):
        if len(shape) != 2:
            raise ConvcoreError(f"{inits.file}: {hf}: initializer {name!r} is {list(shape)}, not a matrix")
        shape = shape[::-1]
    if "rows" in entry:
        a, b = entry["rows"]
        if not 0 <= a < b <= shape[0]:
            raise ConvcoreError(f"{inits.file}: {hf}: rows {a}:{b} outside {name!r} {list(shape)}")
        shape = (b - a, *shape[1:])
    pieces = _transposed_pieces(inits, entry) if entry.get("transpose") else _plain_pieces(inits, entry)
    return TensorRef(hf, tuple(shape), inits.dtype(name), _plain_loader(inits, entry), source=str(inits.file),
                     chunk_loader=pieces)


def _joined(hf: str, parts: list[TensorRef]) -> TensorRef:
    """The matrices ``parts`` one after another (Phi-3's gate and up as HF's gate_up):
    C-ordered, their flat pieces in turn are the joined tensor's."""
    dtypes = {p.dtype for p in parts}
    if len(dtypes) != 1 or len({p.shape[1:] for p in parts}) != 1:
        raise ConvcoreError(f"{parts[0].source}: {hf}: its parts differ in type or row length")
    shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])

    def pieces(dtype: str) -> Iterator[np.ndarray]:
        for part in parts:
            yield from part.load_chunks(dtype)
    return TensorRef(hf, shape, parts[0].dtype, lambda: np.concatenate([p.load() for p in parts]),
                     source=parts[0].source, stored=parts[0].stored,
                     stored_nbytes=sum(p.stored_nbytes for p in parts) if parts[0].stored else 0,
                     chunk_loader=pieces)


def _shifted(ref: TensorRef, add: float) -> TensorRef:
    """``ref`` plus ``add`` (a Gemma norm the builder stored as ``1 + w``), computed in
    float32 and stored back in ``ref``'s type."""
    def load() -> np.ndarray:
        return cast(np.asarray(cast(ref.load(), "f32") + np.float32(add), np.float32), ref.dtype)
    return TensorRef(ref.name, ref.shape, ref.dtype, load, source=ref.source)


#: a transposed MatMul weight is handed out in blocks of about this many bytes of HF rows
TRANSPOSE_BYTES = 64 << 20
TRANSPOSE_SOURCE_ROWS = 256


def _transposed_pieces(inits: Initializers, entry: dict[str, Any]) -> Callable[[str], Iterator[np.ndarray]]:
    """chunk_loader of a MatMul weight stored transposed ([K, N]; HF rows are its columns):
    a block of HF rows at a time, each made from the stored rows a few at a time, their
    pages dropped as they are read (a 262 MB f32 lm_head never resident whole). Every
    block reads the whole stored matrix once, so blocks are large."""
    def pieces(dtype: str) -> Iterator[np.ndarray]:
        k, n = inits.shape(entry["init"])
        a, b = entry.get("rows") or [0, n]
        width = k * numpy_dtype(inits.dtype(entry["init"])).itemsize
        step = max(1, TRANSPOSE_BYTES // max(1, width))
        for r0 in range(a, b, step):
            r1 = min(r0 + step, b)
            stored = inits.read(entry["init"])
            release = page_releaser(stored)
            block = np.empty((r1 - r0, k), stored.dtype)
            for k0 in range(0, k, TRANSPOSE_SOURCE_ROWS):
                rows = stored[k0:k0 + TRANSPOSE_SOURCE_ROWS]
                block[:, k0:k0 + len(rows)] = rows[:, r0:r1].T
                release(rows)
            del stored
            yield cast(block, dtype).reshape(-1)
    return pieces


def _plain_pieces(inits: Initializers, entry: dict[str, Any]) -> Callable[[str], Iterator[np.ndarray]]:
    """chunk_loader of an initializer stored as HF lays it out: flat pieces cast to the
    asked dtype, the mapped pages of the pieces taken dropped behind (core's
    ``cast_chunks``: a piece of the stored type is a view of the map, so its pages go
    only once the writer is past it), so a 2 GB f32 embedding is never resident whole."""
    def pieces(dtype: str) -> Iterator[np.ndarray]:
        array = inits.read(entry["init"])
        if "rows" in entry:
            array = array[entry["rows"][0]:entry["rows"][1]]
        yield from cast_chunks(array, dtype, rowblocks.BLOCK_ELEMENTS)
    return pieces


_MODULE_OP = re.compile(r"^/(?P<module>[\w./]+)/(?P<op>MatMul|Mul)(?:_\d+)?$")


def _by_graph(proto: onnx.ModelProto, inits: Initializers, norm_offset: bool) -> dict[str, dict[str, Any]]:
    """HF name -> entry of a graph another exporter wrote: float initializers that carry
    a parameter's name as they are, and those torch.onnx.export (optimum's exporter)
    leaves anonymous, named after the module in their node's name: a Linear's transposed
    ``[in, out]`` matrix (``onnx::MatMul_745`` in ``/model/layers.0/self_attn/q_proj/MatMul``
    -> ``model.layers.0.self_attn.q_proj.weight``), and a norm's vector its constant folding
    renamed (``onnx::Mul_863`` in ``/model/layers.0/input_layernorm/Mul_1``; with
    ``norm_offset``, Gemma's folded ``1 + w``, taken back to ``w``)."""
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
    out: dict[str, dict[str, Any]] = {}
    named: set[str] = set()
    for node in proto.graph.node:
        match = _MODULE_OP.match(node.name)
        if not match or match["op"] != node.op_type or len(node.input) < 2:
            continue
        init = next((i for i in node.input if "::" in i and i in inits.protos), None)
        t = inits.protos.get(init) if init else None
        if t is None or t.data_type not in floats or init in named:
            continue
        hf = match["module"].replace("/", ".") + ".weight"
        if node.op_type == "MatMul" and len(t.dims) == 2 and node.input[1] == init:
            entry: dict[str, Any] = {"init": init, "transpose": True}
        elif node.op_type == "Mul" and len(t.dims) == 1 and match["module"].endswith("norm"):
            entry = {"init": init, **({"add": -1.0} if norm_offset else {})}
        else:
            continue
        if hf not in out:
            out[hf] = entry
            named.add(init)
    for name, t in inits.protos.items():  # the rest as they are named (none, in optimum's)
        if name not in named and t.data_type in floats and len(t.dims):
            out.setdefault(name, {"init": name})
    return out


def config_problems(file: Path, tensors: dict[str, TensorRef], config: dict[str, Any]) -> list[str]:
    """HF shapes of the mapped weights against config.json (embedding, attention, MLP)."""
    problems = []
    hidden = config.get("hidden_size")
    heads = config.get("num_attention_heads")
    if not hidden or not heads:
        return problems
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    ffn = config.get("intermediate_size")
    expect = {"embed_tokens.weight": (config.get("vocab_size"), hidden),
              "self_attn.q_proj.weight": (heads * head_dim, hidden),
              "self_attn.k_proj.weight": (kv * head_dim, hidden),
              "self_attn.v_proj.weight": (kv * head_dim, hidden),
              "self_attn.o_proj.weight": (hidden, heads * head_dim),
              "mlp.gate_proj.weight": (ffn, hidden), "mlp.up_proj.weight": (ffn, hidden),
              "mlp.down_proj.weight": (hidden, ffn)}
    for name, ref in tensors.items():
        for suffix, shape in expect.items():
            if name.endswith(suffix) and None not in shape and tuple(ref.shape) != tuple(shape):
                problems.append(f"{file}: {name} is {list(ref.shape)}, config.json says {list(shape)}")
    return problems


def load_onnx(path: Path) -> Model:
    file = model_file(path)
    root = file.parent
    proto = parse_model(file)
    inits = Initializers(file, proto)
    inits.check_all()
    meta = {p.key: p.value for p in proto.metadata_props}
    config_file = root / "config.json"
    config = read_json(config_file) if config_file.is_file() else {}
    tensors: dict[str, TensorRef] = {}
    if genai_read.is_builder_folder(root, meta):  # onnxruntime-genai's builder wrote it
        config, mapping = genai_read.builder_model(file, proto, inits, config)
        tensors = {hf: _ref(inits, hf, entry) for hf, entry in mapping.items()}
    elif "convcore.tensors" in meta:
        try:
            mapping = json.loads(meta["convcore.tensors"])
        except ValueError:
            raise ConvcoreError(f"{file}: convcore.tensors metadata is not JSON") from None
        for hf, entry in mapping.items():
            tensors[hf] = _ref(inits, hf, entry)
    else:  # another tool's graph: its initializers by name, MatMul weights by their node's
        gemma = BUILDER_ARCHS.get(str(config.get("model_type"))) == "gemma"  # x * (1 + w)
        mapping = _by_graph(proto, inits, gemma)
        if config.get("tie_word_embeddings", gemma) and "model.embed_tokens.weight" in mapping:
            mapping.pop("lm_head.weight", None)  # the exporter's transposed copy of the embedding
        for hf, entry in mapping.items():
            tensors[hf] = _ref(inits, hf, entry)
    problems = config_problems(file, tensors, config)
    if problems:
        raise ConvcoreError(problems[0])
    metadata: dict[str, Any] = {"source": str(root)}
    if (root / "generation_config.json").is_file():
        metadata["generation_config"] = read_json(root / "generation_config.json")
    return Model(arch=arch_of(config) if config else "unknown", config=config, tensors=tensors,
                 tokenizer=read_tokenizer_files(root), metadata=metadata, source=str(root), format="onnx",
                 companions=read_companions(root, exclude=(
                     "model.onnx", "model.onnx.data", "genai_config.json", "*.onnx", "*.onnx_data",
                     "*.data")))


__all__ = ["Initializers", "load_onnx", "parse_model", "model_file"]
