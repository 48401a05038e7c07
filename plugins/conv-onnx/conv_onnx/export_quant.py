"""Weight-only int4/int8 for the export path: every ``MatMul`` on an HF weight becomes
com.microsoft ``MatMulNBits`` on its quantized form, in the same layout and with the same
``convcore.tensors`` entries as the builder writes, so the reader dequantizes it back.

Which weights: each HF matrix (a ``Linear`` weight) whose every use computes ``x @ W.T``:
a MatMul on the folded ``<hf name>.T``, or a Gemm with ``transB=1`` on it as is. Left in float,
as llama.cpp leaves them: MoE routers (``mlp.gate``, ``block_sparse_moe.gate``) and the
shared-expert gate, whose few outputs decide which experts run; the lm_head unless asked.

The codes are made at save time (``onnx_ir.LazyTensor``), one weight at a time, from the
source tensor in f32 (not from the exported f16 copy).
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np
from convcore import ConvcoreError, Model, cast, get_registry, numpy_dtype, quantize

from .export_graph import Placement

#: HF weights that stay float under --quant: routers and the shared-expert gate
FLOAT_ONLY = re.compile(r"(\.gate|\.shared_expert_gate)\.weight$")
PARTS = ("q", "scales", "zero_points")


def user_metadata(options: dict[str, Any]) -> dict[str, str]:
    """``--metadata`` entries for the ModelProto's ``metadata_props``; the ``convcore.``
    keys are the reader's (one error line)."""
    user = {str(k): str(v) for k, v in (options.get("metadata") or {}).items()}
    for key in user:
        if key.startswith("convcore."):
            raise ConvcoreError(f"--metadata {key}: the convcore.* keys of an onnx model are its "
                                "reader's; choose another key")
    return user


def parse_scheme(scheme: str) -> tuple[int, int, bool]:
    """``int4-b32`` -> (4, 32, False); ``int8-b64-asym`` -> (8, 64, True)."""
    head, _, rest = scheme.partition("-b")
    block, _, asym = rest.partition("-")
    return int(head.removeprefix("int")), int(block), asym == "asym"


def _weight_uses(value: Any, transposed: bool) -> list[Any]:
    """The nodes computing ``x @ W.T`` with ``value`` as their weight: MatMul on the folded
    ``W.T`` (``transposed``), or Gemm(transB=1) on ``W`` itself, as the exporter writes a
    Linear on 2-D input (MoE experts); [] when anything else uses it."""
    nodes = []
    for use in value.uses():
        node = use.node
        if node.domain not in ("", "ai.onnx") or use.idx != 1:
            return []
        if transposed and node.op_type == "MatMul":
            nodes.append(node)
            continue
        attrs = node.attributes
        if (not transposed and node.op_type == "Gemm" and attrs.get_int("transA", 0) == 0
                and attrs.get_int("transB", 0) == 1 and attrs.get_float("alpha", 1.0) == 1.0
                and attrs.get_float("beta", 1.0) == 1.0):
            nodes.append(node)
            continue
        return []
    return nodes


class _Codes:
    """The quantized arrays of one HF weight, made once when the first of them is saved
    and dropped when all have been."""

    def __init__(self, model: Model, hf: str, scheme: str, io_dtype: str, parts: tuple[str, ...]):
        self.model, self.hf, self.scheme, self.io_dtype, self.parts = model, hf, scheme, io_dtype, parts
        self.data: dict[str, np.ndarray] | None = None
        self.taken: set[str] = set()

    def part(self, name: str) -> np.ndarray:
        import onnx_ir as ir
        if self.data is None:
            weight = cast(self.model.tensors[self.hf].load(), "f32")
            data = quantize(weight, self.scheme, {"name": self.hf}, registry=get_registry()).data
            self.data = {"q": data["q"], "scales": cast(data["scales"], self.io_dtype)}
            if "zero_points" in data:
                self.data["zero_points"] = data["zero_points"]
            self.taken = set()
        array = self.data[name]
        self.taken.add(name)
        if self.taken >= set(self.parts):
            self.data = None
        return ir.tensor(np.ascontiguousarray(array))


def quantize_matmuls(ir_model: Any, placed: dict[str, Placement], model: Model, scheme: str,
                     io_dtype: str, accuracy_level: int, lm_head: bool) -> dict[str, dict[str, Any]]:
    """Rewrite the graph's weight MatMuls to MatMulNBits; returns the ``convcore.tensors``
    entries of the HF tensors now stored quantized (the rest keep their placement)."""
    import onnx_ir as ir

    registry = get_registry()
    if scheme not in registry.schemes:
        raise ConvcoreError(f"onnx: unknown scheme {scheme!r} (pip install quant-rowwise)")
    bits, block, _ = parse_scheme(scheme)
    graph = ir_model.graph
    sharing: dict[str, int] = {}
    for where in placed.values():
        sharing[where.init] = sharing.get(where.init, 0) + 1
    entries: dict[str, dict[str, Any]] = {}
    for hf, where in placed.items():
        if sharing[where.init] != 1 or FLOAT_ONLY.search(hf):
            continue
        if hf == "lm_head.weight" and not lm_head:
            continue
        value = graph.initializers.get(where.init)
        if value is None or value.const_value is None:
            continue
        shape = [int(d) for d in value.const_value.shape]
        nodes = _weight_uses(value, where.transpose) if len(shape) == 2 else []
        if not nodes:
            continue
        k, n = shape if where.transpose else shape[::-1]
        layout = registry.schemes[scheme].layout((n, k), "f32")
        parts = tuple(p for p in PARTS if p in layout)
        codes = _Codes(model, hf, scheme, io_dtype, parts)
        tag = hf.removesuffix(".weight")
        names = {"q": f"{tag}.MatMulNBits.weight_Q{bits}", "scales": f"{tag}.MatMulNBits.weight_scales",
                 "zero_points": f"{tag}.MatMulNBits.weight_zero_points"}
        inits = []
        for part in parts:
            dtype = io_dtype if part == "scales" else layout[part][0]
            shape = ir.Shape(layout[part][1])
            ir_dtype = ir.DataType.from_numpy(numpy_dtype(dtype))
            lazy = ir.LazyTensor(lambda p=part, c=codes: c.part(p), dtype=ir_dtype, shape=shape,
                                 name=names[part])
            init = ir.Value(name=names[part], shape=shape, type=ir.TensorType(ir_dtype), const_value=lazy)
            graph.register_initializer(init)
            inits.append(init)
        for node in nodes:
            old = node.outputs[0]
            new = ir.Node("com.microsoft", "MatMulNBits", [node.inputs[0], *inits],
                          attributes=[ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", bits),
                                      ir.AttrInt64("block_size", block),
                                      ir.AttrInt64("accuracy_level", accuracy_level)],
                          name=(node.name or tag) + "/MatMulNBits")
            out = new.outputs[0]
            out.shape, out.type = old.shape, old.type
            graph.insert_before(node, new)
            if len(node.inputs) > 2 and node.inputs[2] is not None:   # Gemm's bias
                add = ir.Node("", "Add", [out, node.inputs[2]], name=new.name + "/bias")
                graph.insert_before(node, add)
                out = add.outputs[0]
                out.shape, out.type = old.shape, old.type
            name = old.name
            ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            out.name = name
        del graph.initializers[where.init]
        entry: dict[str, Any] = {"init": names["q"], "scales": names["scales"], "scheme": scheme,
                                 "shape": [n, k]}
        if "zero_points" in parts:
            entry["zero_points"] = names["zero_points"]
        entries[hf] = entry
    if entries:
        ir_model.opset_imports.setdefault("com.microsoft", 1)
    return entries
