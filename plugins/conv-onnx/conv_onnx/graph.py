"""A small ONNX graph assembler whose weights are written to external data as they are
produced, so a graph of any size is built while holding a few tensors.

Weights are declared with a *producer* (a function returning the arrays of a group,
e.g. a MatMulNBits triple that one quantization makes) and written later, in
declaration order, by :meth:`Graph.write_weights`; the ``TensorProto`` of each gets the
external-data location, offset and length of its bytes.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from convcore import ConvcoreError, dtype_name, numpy_dtype

ONNX_TYPES = {"f32": TensorProto.FLOAT, "f16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16,
              "u8": TensorProto.UINT8, "i8": TensorProto.INT8, "i32": TensorProto.INT32,
              "i64": TensorProto.INT64}
TYPE_NAMES = {v: k for k, v in ONNX_TYPES.items()}
ALIGN = 64 << 10  # tensors of this size or more start on a 64 KiB boundary (mmap-able)
OPSET = 23
IR_VERSION = 11


@dataclass
class Weight:
    name: str
    dtype: str
    shape: tuple[int, ...]
    group: "Group"
    key: str


@dataclass
class Chunked:
    """A weight too large to hold whole: ``rows(a, b)`` makes rows [a, b) (C-contiguous,
    the weight's dtype) as they are written, ``step`` rows at a time. With ``columns``,
    ``rows(a, b)`` makes columns [a, b) of a 2-D weight instead (shape [rows, b - a]),
    written row segment by row segment where they belong in the file (a transposed
    weight is made so from row blocks of its source, each source page read once)."""

    shape: tuple[int, ...]
    dtype: str
    rows: Callable[[int, int], np.ndarray]
    step: int
    columns: bool = False

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * numpy_dtype(self.dtype).itemsize

    def blocks(self):
        for a in range(0, self.shape[0], self.step):
            yield self.rows(a, min(a + self.step, self.shape[0]))


def _write_columns(f, weight: Chunked, offset: int) -> int:
    """Write ``weight`` (``columns``) at ``offset`` of the open file ``f``: each block of
    columns as one segment per row, where it belongs; the file position ends after the
    weight. Returns the bytes written."""
    itemsize = numpy_dtype(weight.dtype).itemsize
    n_rows, n_cols = weight.shape
    f.flush()
    fd = f.fileno()
    written = 0
    for a in range(0, n_cols, weight.step):
        b = min(a + weight.step, n_cols)
        block = np.ascontiguousarray(weight.rows(a, b))
        if tuple(block.shape) != (n_rows, b - a) or dtype_name(block.dtype) != weight.dtype:
            raise ConvcoreError(f"onnx: a block of columns came out {dtype_name(block.dtype)}"
                                f"{list(block.shape)}, planned {weight.dtype}{[n_rows, b - a]}")
        raw = block.view(np.uint8)
        for j in range(n_rows):
            segment = memoryview(raw[j])
            at = offset + (j * n_cols + a) * itemsize
            while segment:  # a regular file takes it whole, but pwrite may be short
                done = os.pwrite(fd, segment, at)
                segment, at = segment[done:], at + done
        written += block.nbytes
        del block, raw
    f.seek(offset + weight.nbytes)
    return written


@dataclass
class Group:
    """Arrays produced together (one source tensor or one fused/quantized matrix)."""

    producer: Callable[[], dict[str, np.ndarray]]
    sources: tuple[str, ...]  # the HF tensors it reads, reported to progress once written
    pending: int = 0
    result: dict[str, np.ndarray] | None = None


@dataclass
class Graph:
    name: str = "convcore"
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    consts: list[TensorProto] = field(default_factory=list)
    weights: list[Weight] = field(default_factory=list)
    inputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    outputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)  # HF name -> where it lives
    _names: set[str] = field(default_factory=set)
    _consts: dict[tuple, str] = field(default_factory=dict)

    # -- nodes ------------------------------------------------------------------------
    def node(self, op: str, inputs: list[str], name: str, outputs: int | list[str] = 1,
             domain: str = "", **attrs: Any) -> list[str]:
        if name in self._names:
            raise ValueError(f"duplicate node name {name}")
        self._names.add(name)
        outs = outputs if isinstance(outputs, list) else [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs

    def op(self, op: str, inputs: list[str], name: str, domain: str = "", **attrs: Any) -> str:
        return self.node(op, inputs, name, 1, domain, **attrs)[0]

    def const(self, array: np.ndarray) -> str:
        """An inline constant initializer (small arrays only), shared between users."""
        array = np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = f"/constants/{array.dtype.name}/{len(self._consts)}"
            self.consts.append(numpy_helper.from_array(array, name))
            self._consts[key] = name
        return self._consts[key]

    # -- weights ----------------------------------------------------------------------
    def group(self, producer: Callable[[], dict[str, np.ndarray]], sources: tuple[str, ...]) -> Group:
        return Group(producer, tuple(sources))

    def weight(self, name: str, dtype: str, shape: tuple[int, ...], group: Group, key: str = "") -> str:
        group.pending += 1
        self.weights.append(Weight(name, dtype, tuple(int(s) for s in shape), group, key or name))
        return name

    def io(self, name: str, dtype: str, dims: list[Any], output: bool = False) -> str:
        value = helper.make_tensor_value_info(name, ONNX_TYPES[dtype], dims)
        (self.outputs if output else self.inputs).append(value)
        return name

    # -- writing ----------------------------------------------------------------------
    def write_weights(self, data_path: Path, location: str,
                      progress: Callable[[str], None]) -> list[TensorProto]:
        """Produce every weight in order, append its bytes to ``data_path`` and return the
        initializers pointing at them. A group's arrays are dropped once all are written."""
        protos = []
        # groups in first-use order; the next one is produced on a worker thread while
        # this one is written (casts, transposes and quantization release the GIL), so
        # at most two groups' arrays are alive
        order: list[Group] = []
        for w in self.weights:
            if not order or order[-1] is not w.group:
                order.append(w.group)
        ahead: dict[int, Future] = {}
        with open(data_path, "wb") as f, ThreadPoolExecutor(max_workers=1) as pool:
            offset = 0
            index = -1
            for w in self.weights:
                g = w.group
                if g.result is None:
                    index = next(i for i in range(index + 1, len(order)) if order[i] is g)
                    future = ahead.pop(index, None)
                    g.result = future.result() if future is not None else g.producer()
                    if index + 1 < len(order) and order[index + 1].result is None:
                        ahead[index + 1] = pool.submit(order[index + 1].producer)
                array = g.result.pop(w.key)
                chunked = isinstance(array, Chunked)
                kind = array.dtype if chunked else dtype_name(array.dtype)
                if tuple(array.shape) != w.shape or kind != w.dtype:
                    raise ConvcoreError(f"onnx: {w.name} came out {kind}{list(array.shape)}, "
                                        f"planned {w.dtype}{list(w.shape)}")
                if not chunked:
                    array = np.ascontiguousarray(array)
                nbytes = array.nbytes
                if nbytes >= ALIGN and offset % ALIGN:
                    pad = ALIGN - offset % ALIGN
                    f.write(b"\0" * pad)
                    offset += pad
                written = 0
                if chunked and array.columns:
                    written = _write_columns(f, array, offset)
                for block in ([] if chunked and array.columns else array.blocks() if chunked else [array]):
                    block = np.ascontiguousarray(block)
                    if dtype_name(block.dtype) != w.dtype:
                        raise ConvcoreError(f"onnx: {w.name}: a block came out {block.dtype}, "
                                            f"planned {w.dtype}")
                    f.write(block.reshape(-1).view(np.uint8).data)
                    written += block.nbytes
                    del block
                if written != nbytes:
                    raise ConvcoreError(f"onnx: {w.name}: wrote {written} bytes, planned {nbytes}")
                proto = TensorProto()
                proto.name = w.name
                proto.data_type = ONNX_TYPES[w.dtype]
                proto.dims.extend(w.shape)
                proto.data_location = TensorProto.EXTERNAL
                for k, v in (("location", location), ("offset", str(offset)), ("length", str(nbytes))):
                    entry = proto.external_data.add()
                    entry.key, entry.value = k, v
                protos.append(proto)
                offset += nbytes
                del array
                g.pending -= 1
                if g.pending == 0:
                    g.result = None
                    for source in g.sources:
                        progress(source)
        return protos

    def model(self, initializers: list[TensorProto], metadata: dict[str, str]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs,
                                  initializer=[*self.consts, *initializers])
        model = helper.make_model(graph, ir_version=IR_VERSION, producer_name="convcore",
                                  opset_imports=[helper.make_opsetid("", OPSET),
                                                 helper.make_opsetid("com.microsoft", 1)])
        for key, value in metadata.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        return model


def tensors_metadata(tensors: dict[str, dict[str, Any]]) -> str:
    return json.dumps(tensors, separators=(",", ":"))
