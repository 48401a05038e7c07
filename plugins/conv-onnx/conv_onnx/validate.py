"""Checks of an ONNX directory: the graph parses and passes ``onnx.checker``, every
external initializer lies inside the directory with the bytes its shape needs, the
decoder's inputs and outputs are there, ``genai_config.json`` agrees with the graph and
the weights agree with config.json."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import onnx

from convcore import ConvcoreError

from .reader import Initializers, load_onnx, model_file, parse_model
from .genai_read import NeedsConfig

PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")


def _dims(value: onnx.ValueInfoProto) -> list[Any]:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param
            for d in value.type.tensor_type.shape.dim]


def _check_genai(root: Path, proto: onnx.ModelProto, inputs: dict, outputs: dict) -> list[str]:
    problems = []
    file = root / "genai_config.json"
    try:
        gen = json.loads(file.read_text())
        dec = gen["model"]["decoder"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{file}: unreadable or without model.decoder ({type(exc).__name__})"]
    if dec.get("filename", "model.onnx") != "model.onnx" and not (root / dec["filename"]).is_file():
        problems.append(f"{file}: decoder.filename {dec['filename']!r} does not exist")
    names = dec.get("inputs", {})
    for key in ("input_ids", "attention_mask", "position_ids"):
        if key in names and names[key] not in inputs:
            problems.append(f"{file}: input {names[key]!r} is not a graph input")
    outs = dec.get("outputs", {})
    if outs.get("logits", "logits") not in outputs:
        problems.append(f"{file}: output {outs.get('logits')!r} is not a graph output")
    layers = dec.get("num_hidden_layers")
    past = [n for n in inputs if PAST.match(n)]
    if layers is not None and len(past) != 2 * int(layers):
        problems.append(f"{file}: num_hidden_layers {layers}, the graph has {len(past) // 2} past key/value pairs")
    if past:
        dims = _dims(inputs[past[0]])
        if len(dims) == 4:
            for key, axis in (("num_key_value_heads", 1), ("head_size", 3)):
                if key in dec and isinstance(dims[axis], int) and dims[axis] != dec[key]:
                    problems.append(f"{file}: {key} {dec[key]} but {past[0]} has {dims[axis]}")
    vocab = gen["model"].get("vocab_size")
    if "logits" in outputs and vocab is not None:
        last = _dims(outputs["logits"])[-1:]
        if last and isinstance(last[0], int) and last[0] != vocab:
            problems.append(f"{file}: vocab_size {vocab} but logits has {last[0]}")
    return problems


def _check_nbits(file: Path, proto: onnx.ModelProto, inits: Initializers) -> list[str]:
    problems = []
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        k, n, bits, block = (int(attrs.get(x, 0)) for x in ("K", "N", "bits", "block_size"))
        blocks = -(-k // block) if block else 0
        want = {node.input[1]: (n, blocks, block * bits // 8), node.input[2]: (n, blocks)}
        for name, shape in want.items():
            if name in inits.protos:
                got = inits.shape(name)
                if math.prod(got) != math.prod(shape):
                    problems.append(f"{file}: {node.name}: initializer {name!r} is {list(got)}, "
                                    f"K={k} N={n} bits={bits} block={block} need {list(shape)}")
    return problems


#: what onnx.checker says of an operator it has no schema for (onnxruntime's own operators:
#: com.microsoft's, and those it registers in the default domain, such as
#: SimplifiedLayerNormalization and SkipSimplifiedLayerNormalization)
UNKNOWN_OP = re.compile(r"No (Op|Opset|Schema) registered for", re.I)


def check_graph(file: Path) -> list[str]:
    """``onnx.checker`` on the graph; where it stops at an operator it does not know, what
    onnxruntime says instead: a session built with graph optimizations off (nothing run)
    checks every node against onnxruntime's own schemas and kernels."""
    try:
        onnx.checker.check_model(str(file))
        return []
    except onnx.checker.ValidationError as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
    if not UNKNOWN_OP.search(first):
        return [f"{file}: onnx.checker: {first}"]
    try:
        import onnxruntime as ort
    except ImportError:
        return [f"{file}: onnx.checker: {first} (onnxruntime, which may run that operator, is not installed)"]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    try:
        ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own errors (Fail, InvalidGraph, ...)
        said = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        return [f"{file}: onnxruntime cannot load it: {said}"]
    return []


def validate_onnx(path: Path) -> list[str]:
    file = model_file(Path(path))
    root = file.parent
    try:
        proto = parse_model(file)
        inits = Initializers(file, proto)
        inits.check_all()
    except ConvcoreError as exc:
        return [str(exc)]
    problems = check_graph(file)
    inputs = {i.name: i for i in proto.graph.input}
    outputs = {o.name: o for o in proto.graph.output}
    if "input_ids" not in inputs:
        problems.append(f"{file}: no input_ids input")
    if "logits" not in outputs and "last_hidden_state" not in outputs:
        problems.append(f"{file}: neither a logits nor a last_hidden_state output")
    if "logits" in outputs:
        past = sorted(n for n in inputs if PAST.match(n))
        for name in past:
            present = name.replace("past_key_values", "present")
            if present not in outputs:
                problems.append(f"{file}: {name} has no matching output {present}")
        if (root / "genai_config.json").is_file():
            problems += _check_genai(root, proto, inputs, outputs)
        elif file.name == "model.onnx" and any(p.key == "convcore.tensors" for p in proto.metadata_props):
            # ours always comes with one; another exporter's (optimum's) runs in onnxruntime without
            problems.append(f"{root}: no genai_config.json (onnxruntime-genai needs it)")
    problems += _check_nbits(file, proto, inits)
    try:
        load_onnx(file if file.name != "model.onnx" else root)  # also checks shapes vs config.json
    except NeedsConfig:
        pass  # a builder's graph onnxruntime runs; reading it back needs the source's config.json
    except ConvcoreError as exc:
        problems.append(str(exc))
    return problems
