"""What the export path does to the graph ``torch.onnx.export`` returns, before saving.

Facts about the dynamo exporter (torch 2.13, onnxscript 0.7) this module relies on:

- Initializers of parameters and buffers are named by the module's fully qualified
  name (``<wrapper attribute>.model.layers.0.self_attn.q_proj.weight``); a tensor shared
  by two modules (tied embeddings) is one initializer under one of its names.
- ``nn.Linear`` weights feed ``Transpose(perm=[1, 0]) -> MatMul``. The exporter's
  optimizer (``optimize=True``) folds those transposes into anonymous ``val_N``
  initializers and also folds other ops on weights (Gemma's ``1 + weight``), losing the
  names; it merges identical small initializers (<= 1024 elements) and drops unused ones.

So the export runs with ``optimize=False`` and this module: strips the wrapper prefix and
names each initializer by its HF name, folds weight transposes itself into
``<hf name>.T`` initializers (computed lazily, at save time), runs onnxscript's optimizer
with folding of anything that reads an HF weight turned off, and then finds where every HF
tensor ended up (merged into an identical initializer, or re-added when the graph does not
use it) for the ``convcore.tensors`` metadata.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

METADATA_KEY = "convcore.tensors"
TRANSPOSED_SUFFIX = ".T"


@dataclass
class Placement:
    """Where an HF tensor lives in the graph: initializer name, stored transposed or not."""

    init: str
    transpose: bool = False


def _is_2d_transpose(node: Any) -> bool:
    if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return False
    perm = node.attributes.get_ints("perm", None)
    return perm is None or list(perm) == [1, 0]


def rename_initializers(graph: Any, names: dict[str, str]) -> None:
    """Rename initializers ``old -> new`` (values not in the graph are skipped)."""
    for old, new in names.items():
        value = graph.initializers.get(old)
        if value is not None and old != new:
            if new in graph.initializers:
                raise RuntimeError(f"initializer name clash: {new!r}")
            value.name = new


def fold_weight_transposes(graph: Any, weights: set[str]) -> dict[str, str]:
    """Replace ``Transpose(W)`` by a transposed initializer ``W.T`` for each 2-D
    initializer in ``weights`` whose only uses are such transposes. Returns
    ``{W: W.T}`` for the ones folded (a weight with other uses, such as a tied
    embedding that a Gather also reads, stays as it is)."""
    import onnx_ir as ir

    folded: dict[str, str] = {}
    for name in sorted(weights):
        value = graph.initializers.get(name)
        if value is None or value.const_value is None or len(value.const_value.shape) != 2:
            continue
        uses = list(value.uses())
        if not uses or not all(_is_2d_transpose(use.node) for use in uses):
            continue
        source = value.const_value
        rows, cols = (int(d) for d in source.shape)
        new_name = name + TRANSPOSED_SUFFIX
        if new_name in graph.initializers:
            continue

        def transposed(t: Any = source) -> Any:
            return ir.tensor(np.ascontiguousarray(t.numpy().T))

        lazy = ir.LazyTensor(transposed, dtype=source.dtype, shape=ir.Shape([cols, rows]), name=new_name)
        new_value = ir.Value(name=new_name, shape=ir.Shape([cols, rows]),
                             type=ir.TensorType(source.dtype), const_value=lazy)
        graph.register_initializer(new_value)
        for use in uses:
            node = use.node
            ir.convenience.replace_all_uses_with(node.outputs[0], new_value, replace_graph_outputs=True)
            graph.remove(node, safe=True)
        del graph.initializers[name]
        folded[name] = new_name
    return folded


def optimize_keeping(model: Any, protected: set[str]) -> None:
    """onnxscript's optimizer, never folding a node that reads one of the ``protected``
    initializers (so HF weights keep their names and their bytes)."""
    from onnxscript import optimizer

    graph = model.graph
    keep = {id(graph.initializers[n]) for n in protected if n in graph.initializers}

    def should_fold(node: Any) -> bool | None:
        if any(inp is not None and id(inp) in keep for inp in node.inputs):
            return False
        return None

    optimizer.optimize_ir(model, should_fold=should_fold)


def _same_bytes(a: Any, b: Any) -> bool:
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    return a.tobytes() == b.tobytes()


def place_tensors(
    graph: Any,
    wanted: dict[str, Placement],
    saved: dict[str, Any],
    fallback: dict[str, Callable[[], Any]],
) -> dict[str, Placement]:
    """Final placement of every HF tensor after optimization.

    ``wanted`` is where each HF tensor was before optimizing, ``saved`` the tensor
    (TensorProtocol) each of those initializers held, ``fallback`` builds the
    TensorProtocol of an HF tensor the graph never had. A tensor whose initializer the
    optimizer merged into an identical one points at that one; one the graph does not use
    (or never had) is added back as an initializer under its own name.
    """
    import onnx_ir as ir

    placed: dict[str, Placement] = {}
    small: dict[tuple, list[str]] | None = None
    for hf_name, where in wanted.items():
        if where.init in graph.initializers:
            placed[hf_name] = where
            continue
        tensor = saved.get(where.init)
        target = None
        if tensor is not None and int(np.prod(tensor.shape)) <= 4096:
            if small is None:  # index of the graph's small initializers, built once
                small = {}
                for name, value in graph.initializers.items():
                    cv = value.const_value
                    if cv is not None and int(np.prod(cv.shape)) <= 4096:
                        small.setdefault((cv.dtype, tuple(cv.shape)), []).append(name)
            for name in small.get((tensor.dtype, tuple(tensor.shape)), []):
                if _same_bytes(graph.initializers[name].const_value, tensor):
                    target = name
                    break
        if target is not None:
            placed[hf_name] = Placement(target, where.transpose)
            continue
        # not used by the graph: keep it as an initializer of its own, so the file still
        # holds every tensor of the source
        if tensor is None:
            tensor = fallback[hf_name]()
        name = where.init if where.init not in graph.initializers else hf_name
        n = 0
        while name in graph.initializers:
            n += 1
            name = f"{hf_name}.{n}"
        graph.register_initializer(ir.Value(name=name, shape=ir.Shape(tensor.shape),
                                            type=ir.TensorType(tensor.dtype), const_value=tensor))
        placed[hf_name] = Placement(name, where.transpose)
    return placed


def check_placements(graph: Any, placed: dict[str, Placement], shapes: dict[str, tuple[int, ...]]) -> None:
    """Every placement names an initializer of the HF shape (reversed when transposed)."""
    for hf_name, where in placed.items():
        value = graph.initializers.get(where.init)
        if value is None or value.const_value is None:
            raise AssertionError(f"{hf_name}: initializer {where.init!r} missing from the exported graph")
        shape = tuple(int(d) for d in value.const_value.shape)
        expected = tuple(shapes[hf_name])
        if where.transpose:
            expected = expected[::-1]
        if shape != expected:
            raise AssertionError(f"{hf_name}: initializer {where.init!r} has shape {list(shape)}, "
                                 f"expected {list(expected)}")


# node metadata the torch exporter writes that only serves debugging it: Python stack
# traces (with this machine's absolute paths) and FX node reprs, most of model.onnx's size
DEBUG_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")


def strip_debug_metadata(model: Any) -> None:
    for graph in model.graphs():
        for node in graph:
            for key in DEBUG_METADATA:
                node.metadata_props.pop(key, None)


def save_with_external_data(model: Any, path: Any, weights: set[str], inline_max: int = 1024) -> None:
    """Save ``model`` at ``path`` with the ``weights`` initializers (every HF tensor, any
    size) and every initializer over ``inline_max`` bytes in one external data file,
    ``<path name>.data`` beside it, referenced by a relative location. Small constants
    (shapes, axes, scalars) stay inline: ONNX Runtime's shape inference reads them and
    cannot read external data."""
    import onnx_ir as ir
    from onnx_ir import external_data
    from pathlib import Path

    path = Path(path)
    values = [v for v in model.graph.initializers.values()
              if v.const_value is not None and (v.name in weights or v.const_value.nbytes > inline_max)]
    tensors = external_data.convert_tensors_to_external(
        [v.const_value for v in values], path.parent, path.name + ".data")
    for value, tensor in zip(values, tensors, strict=True):
        value.const_value = tensor
    ir.save(model, path)
