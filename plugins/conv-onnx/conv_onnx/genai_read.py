"""Folders written by onnxruntime-genai's model builder (``python -m
onnxruntime_genai.models.builder``), read back as HF tensors and an HF config.

The builder leaves no ``convcore.tensors`` and usually no config.json, so both come from
the graph: each ``MatMul`` / ``MatMulNBits`` / ``Add`` node names its initializer after the
HF module (``model.layers.0.attn.qkv_proj.MatMul.weight[_Q4]``, ``...Add.bias``), the
norms keep HF names (the last one is ``model.layers.{L}.final_norm_layernorm.weight``),
and the sizes, epsilon, softcaps, sliding window and rotary base are read from
``genai_config.json``, the nodes' attributes and the ``cos_cache``/``sin_cache`` tables.
Each HF tensor becomes an entry of the reader's mapping (:mod:`conv_onnx.reader`): the
fused q/k/v matrix split by rows, a MatMul weight transposed, MatMulNBits blocks
dequantized, a tied embedding read from ``lm_head``, gate and up joined for Phi-3, and a
Gemma norm's folded ``1 + w`` taken back to ``w`` (exact to the float's rounding of
``1 + w``, half a unit in the last place of 1).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from convcore import ConvcoreError, read_json

#: genai_config ``type`` -> (HF architecture class, model_type, activation)
GENAI_TYPES = {
    "llama": ("LlamaForCausalLM", "llama", "silu"),
    "mistral": ("MistralForCausalLM", "mistral", "silu"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", "silu"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", "silu"),
    "phi3": ("Phi3ForCausalLM", "phi3", "silu"),
    "gemma": ("GemmaForCausalLM", "gemma", "gelu_pytorch_tanh"),
    "gemma2": ("Gemma2ForCausalLM", "gemma2", "gelu_pytorch_tanh"),
    "gemma3_text": ("Gemma3ForCausalLM", "gemma3_text", "gelu_pytorch_tanh"),
}
GEMMA = ("gemma", "gemma2", "gemma3_text")
_WEIGHT = re.compile(r"^(?P<module>.+)\.MatMul\.weight(?:_Q(?P<bits>\d+))?$")
_BIAS = re.compile(r"^(?P<module>.+)\.Add\.bias$")


class NeedsConfig(ConvcoreError):
    """The graph runs, but cannot say its HF config alone (a scaled rotary table): the
    source's config.json must be put beside it to read it back."""


def _float(value: float) -> float:
    """A float32 attribute as the decimal it was written from (9.99999997e-07 -> 1e-06)."""
    return float(str(np.float32(value)))


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _hf_module(module: str) -> str:
    """The builder's module name as HF names it (``attn`` is ``self_attn``)."""
    return re.sub(r"^(model\.layers\.\d+)\.attn\.", r"\1.self_attn.", module)


class _Graph:
    """What the builder's graph says: initializer entries by HF module, node attributes."""

    def __init__(self, file: Path, model: onnx.ModelProto, inits: Any):
        self.file, self.inits = file, inits
        self.nodes = list(model.graph.node)
        self.constants = {o: n for n in self.nodes if n.op_type == "Constant" for o in n.output}
        self.weights: dict[str, dict[str, Any]] = {}  # HF module -> entry of its weight
        self.biases: dict[str, dict[str, Any]] = {}
        for node in self.nodes:
            if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in inits.protos:
                match = _WEIGHT.match(node.input[1])
                if match:
                    k, n = inits.shape(node.input[1])
                    self.weights[_hf_module(match["module"])] = {"init": node.input[1], "transpose": True,
                                                                 "shape": [n, k]}
            elif node.op_type == "MatMulNBits" and _WEIGHT.match(node.input[1]):
                self.weights[_hf_module(_WEIGHT.match(node.input[1])["module"])] = self._nbits(node)
            elif node.op_type == "Add":
                for name in node.input:
                    match = _BIAS.match(name)
                    if match and name in inits.protos:
                        self.biases[_hf_module(match["module"])] = {"init": name, "shape": list(inits.shape(name))}

    def _nbits(self, node: onnx.NodeProto) -> dict[str, Any]:
        a = _attrs(node)
        zero_points = node.input[3] if len(node.input) > 3 and node.input[3] else None
        scheme = f"int{a['bits']}-b{a['block_size']}" + ("-asym" if zero_points else "")
        entry = {"init": node.input[1], "scales": node.input[2], "scheme": scheme, "shape": [a["N"], a["K"]]}
        if zero_points:
            entry["zero_points"] = zero_points
        return entry

    def first(self, op: str) -> onnx.NodeProto | None:
        return next((n for n in self.nodes if n.op_type == op), None)

    def constant(self, name: str) -> float | None:
        node = self.constants.get(name)
        if node is None:
            return float(numpy_helper.to_array(self.inits.protos[name])) if name in self.inits.protos else None
        return float(numpy_helper.to_array(_attrs(node)["value"]))


def is_builder_folder(root: Path, meta: dict[str, str]) -> bool:
    return "convcore.tensors" not in meta and (root / "genai_config.json").is_file()


def builder_model(file: Path, model: onnx.ModelProto, inits: Any, config: dict[str, Any]
                  ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(HF config, HF name -> reader entry) of a builder folder; ``config``: config.json
    where the folder has one (kept as it is), else rebuilt from the graph."""
    genai_file = file.parent / "genai_config.json"
    genai = read_json(genai_file).get("model")
    if not isinstance(genai, dict) or not isinstance(genai.get("decoder"), dict):
        raise ConvcoreError(f"{genai_file}: no model.decoder section")
    kind = genai.get("type")
    if kind not in GENAI_TYPES:
        raise ConvcoreError(f"{genai_file}: model type {kind!r} is not read back (known: "
                            f"{', '.join(GENAI_TYPES)})")
    dec = genai["decoder"]
    try:
        sizes = {k: int(dec[k]) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                          "num_hidden_layers", "head_size")}
    except (KeyError, TypeError, ValueError) as exc:
        raise ConvcoreError(f"{genai_file}: decoder has no integer {exc}") from None
    graph = _Graph(file, model, inits)
    mapping = _mapping(graph, kind, sizes)
    if not config:
        config = _config(graph, genai, kind, sizes, mapping)
    return config, mapping


def _mapping(g: _Graph, kind: str, sizes: dict[str, int]) -> dict[str, dict[str, Any]]:
    inits = g.inits
    out: dict[str, dict[str, Any]] = {}
    q = sizes["num_attention_heads"] * sizes["head_size"]
    kv = sizes["num_key_value_heads"] * sizes["head_size"]
    offset = {"add": -1.0} if kind in GEMMA else {}
    for name in inits.protos:
        if not name.endswith("layernorm.weight"):
            continue
        hf = re.sub(r"^model\.layers\.\d+\.final_norm_layernorm\.weight$", "model.norm.weight", name)
        hf = re.sub(r"\.attn\.([qk]_norm)\.layernorm\.weight$", r".self_attn.\1.weight", hf)
        out[hf] = {"init": name, **offset}
    for module, entry in sorted(g.weights.items()):
        bias = g.biases.get(module)
        if module.endswith(".self_attn.qkv_proj") and kind != "phi3":
            head = module[:-len("qkv_proj")]
            for part, (a, b) in zip("qkv", ((0, q), (q, q + kv), (q + kv, q + 2 * kv))):
                out[f"{head}{part}_proj.weight"] = {**entry, "rows": [a, b]}
                if bias:
                    out[f"{head}{part}_proj.bias"] = {**bias, "rows": [a, b]}
            continue
        out[f"{module}.weight"] = entry
        if bias:
            out[f"{module}.bias"] = bias
    if kind == "phi3":  # HF Phi-3 keeps gate and up as one matrix; the builder splits them
        for gate in [m for m in out if m.endswith(".mlp.gate_proj.weight")]:
            up = gate.replace("gate_proj", "up_proj")
            out[gate.replace("gate_proj", "gate_up_proj")] = {"concat": [out.pop(gate), out.pop(up)]}
    if "model.embed_tokens.weight" in inits.protos:
        out["model.embed_tokens.weight"] = {"init": "model.embed_tokens.weight"}
    elif "lm_head.weight" in out:  # tied: the graph gathers rows of lm_head's matrix
        out["model.embed_tokens.weight"] = out.pop("lm_head.weight")
    else:
        raise ConvcoreError(f"{g.file}: neither model.embed_tokens.weight nor lm_head's weight is "
                            "in the graph")
    return out


def _config(g: _Graph, genai: dict[str, Any], kind: str, sizes: dict[str, int],
            mapping: dict[str, dict[str, Any]]) -> dict[str, Any]:
    arch, model_type, act = GENAI_TYPES[kind]
    layers = sizes["num_hidden_layers"]
    ffn = _ffn(g, mapping)
    config: dict[str, Any] = {
        "architectures": [arch], "model_type": model_type, "hidden_size": sizes["hidden_size"],
        "intermediate_size": ffn, "num_attention_heads": sizes["num_attention_heads"],
        "num_key_value_heads": sizes["num_key_value_heads"], "head_dim": sizes["head_size"],
        "num_hidden_layers": layers, "vocab_size": int(genai.get("vocab_size") or 0)
        or _rows(g, mapping["model.embed_tokens.weight"]),
        "max_position_embeddings": int(genai.get("context_length") or 0) or None,
        "tie_word_embeddings": "lm_head.weight" not in mapping,
        "hidden_act": act, "torch_dtype": "float32",
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if genai.get(key) is not None:
            config[key] = genai[key]
    norm = g.first("SimplifiedLayerNormalization") or g.first("SkipSimplifiedLayerNormalization")
    if norm is not None and "epsilon" in _attrs(norm):
        config["rms_norm_eps"] = _float(_attrs(norm)["epsilon"])
    theta, rotary = _rope(g)
    config["rope_theta"] = theta
    if rotary != sizes["head_size"]:
        config["partial_rotary_factor"] = rotary / sizes["head_size"]
    if kind in ("llama", "mistral", "phi3"):
        config["attention_bias"] = any(k.endswith("q_proj.bias") or k.endswith("qkv_proj.bias") for k in mapping)
    if kind == "phi3":
        config["original_max_position_embeddings"] = config["max_position_embeddings"]
    if kind in GEMMA:
        config["hidden_activation"] = act
    attention = [n for n in g.nodes if n.op_type == "GroupQueryAttention"]
    if attention:
        a = _attrs(attention[0])
        if kind in ("gemma2", "gemma3_text") and a.get("scale"):
            config["query_pre_attn_scalar"] = round(1 / float(a["scale"]) ** 2)
        if a.get("softcap"):
            config["attn_logit_softcapping"] = _float(a["softcap"])
        windows = [int(_attrs(n).get("local_window_size", -1)) for n in attention]
        sliding = [w for w in windows if w > 0]
        if sliding:
            config["sliding_window"] = sliding[0]
            config["layer_types"] = ["sliding_attention" if w > 0 else "full_attention" for w in windows]
    if kind in ("gemma2", "gemma3_text"):
        cap = next((n for n in g.nodes if n.op_type == "Div" and "softcap" in n.name
                    and n.name.startswith("/lm_head")), None)
        config["final_logit_softcapping"] = _float(g.constant(cap.input[1])) if cap is not None else None
    return config


def _ffn(g: _Graph, mapping: dict[str, dict[str, Any]]) -> int:
    entry = mapping.get("model.layers.0.mlp.gate_proj.weight") or mapping.get("model.layers.0.mlp.down_proj.weight")
    if entry is None and "model.layers.0.mlp.gate_up_proj.weight" in mapping:
        return _rows(g, mapping["model.layers.0.mlp.gate_up_proj.weight"]["concat"][0])
    if entry is None:
        raise ConvcoreError(f"{g.file}: no MLP weights of layer 0 in the graph")
    if "down_proj" in entry.get("init", ""):
        return _cols(g, entry)
    return _rows(g, entry)


def _rows(g: _Graph, entry: dict[str, Any]) -> int:
    if entry.get("scheme"):
        return int(entry["shape"][0])
    shape = g.inits.shape(entry["init"])
    return int(shape[1] if entry.get("transpose") else shape[0])


def _cols(g: _Graph, entry: dict[str, Any]) -> int:
    if entry.get("scheme"):
        return int(entry["shape"][1])
    shape = g.inits.shape(entry["init"])
    return int(shape[0] if entry.get("transpose") else shape[1])


def _rope(g: _Graph) -> tuple[float, int]:
    """(rope_theta, rotary dimension) read from ``cos_cache``/``sin_cache``: position 1's
    angles are the inverse frequencies; the base is fitted on the lowest one, and the
    roundest base within a few digits of it whose plain rotary table is the graph's is
    taken (a scaled table, such as Llama-3's or YaRN's, fits none: it needs the source's
    config.json beside the graph)."""
    if "cos_cache" not in g.inits.protos or "sin_cache" not in g.inits.protos:
        raise NeedsConfig(f"{g.file}: no cos_cache/sin_cache to read the rotary base from; "
                            "put the source's config.json beside model.onnx")
    cos = np.asarray(g.inits.read("cos_cache"), np.float32)
    sin = np.asarray(g.inits.read("sin_cache"), np.float32)
    half = cos.shape[1]
    if cos.shape != sin.shape or cos.shape[0] < 2 or half < 2:
        raise ConvcoreError(f"{g.file}: cos_cache {list(cos.shape)} / sin_cache {list(sin.shape)} "
                            "are not rotary tables")
    inv = np.arctan2(sin[1].astype(np.float64), cos[1].astype(np.float64))
    rotary = 2 * half
    if not 0 < inv[-1] < 1:
        raise ConvcoreError(f"{g.file}: cos_cache's position 1 holds no rotary angles")
    fitted = math.exp(-math.log(inv[-1]) * rotary / (2 * (half - 1)))
    tolerance = 1e-3 if g.inits.dtype("cos_cache") != "f32" else 1e-4
    # the roundest base whose table is the graph's (an f16 table pins it to a few digits)
    digits = int(math.log10(fitted)) if fitted >= 1 else 0
    for theta in [round(fitted, -k) for k in range(digits, -1, -1)] + [fitted]:
        if theta > 1 and _table_error(theta, rotary, cos, sin) <= tolerance:
            break
    else:
        raise NeedsConfig(f"{g.file}: cos_cache is not plain rotary embedding of any base (rope "
                            "scaling?); put the source's config.json beside model.onnx")
    return float(theta), rotary


def _table_error(theta: float, rotary: int, cos: np.ndarray, sin: np.ndarray) -> float:
    """The largest difference between plain rotary tables of base ``theta`` and the graph's."""
    inv = (1.0 / (theta ** (np.arange(0, rotary, 2, dtype=np.int64).astype(np.float32) / rotary)))
    angles = np.outer(np.arange(cos.shape[0], dtype=np.float32), inv.astype(np.float32))
    return float(max(np.abs(np.cos(angles) - cos).max(), np.abs(np.sin(angles) - sin).max()))


__all__ = ["GENAI_TYPES", "NeedsConfig", "builder_model", "is_builder_folder"]
