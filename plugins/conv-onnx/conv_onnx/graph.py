"""A small ONNX graph assembler whose weights are written to external data as they are
produced, so a graph of any size is built while holding a few tensors.

Weights are declared with a *producer* (a function returning the arrays of a group,
e.g. a MatMulNBits triple that one quantization makes) and written later, in
declaration order, by :meth:`Graph.write_weights`; the ``TensorProto`` of each gets the
external-data location, offset and length of its bytes.
"""
from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from convcore import ConvcoreError, numpy_dtype

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
                if tuple(array.shape) != w.shape or array.dtype != numpy_dtype(w.dtype):
                    raise ConvcoreError(f"onnx: {w.name} came out {array.dtype}{list(array.shape)}, "
                                        f"planned {w.dtype}{list(w.shape)}")
                array = np.ascontiguousarray(array)
                if array.nbytes >= ALIGN and offset % ALIGN:
                    pad = ALIGN - offset % ALIGN
                    f.write(b"\0" * pad)
                    offset += pad
                f.write(array.reshape(-1).view(np.uint8).data)
                proto = TensorProto()
                proto.name = w.name
                proto.data_type = ONNX_TYPES[w.dtype]
                proto.dims.extend(w.shape)
                proto.data_location = TensorProto.EXTERNAL
                for k, v in (("location", location), ("offset", str(offset)), ("length", str(array.nbytes))):
                    entry = proto.external_data.add()
                    entry.key, entry.value = k, v
                protos.append(proto)
                offset += array.nbytes
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
