"""What the direct builder needs to know about each decoder family, read from config.json.

A :class:`Decoder` is everything the graph depends on: sizes, which norms sit where,
activation, biases, per-head q/k norms, softcaps, the sliding window of each layer and
the rotary tables. Families map HF tensor names onto the graph's slots in
:func:`layer_names`; an arch not listed here goes to the export path.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from convcore import ConvcoreError, hfconfig

# families the builder writes; the value is the family's layout
BUILDER_ARCHS = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "phi3": "llama",
    "gemma": "gemma", "gemma2": "gemma", "gemma3_text": "gemma",
}


@dataclass
class Rope:
    """One rotary table: inverse frequencies and the factor cos/sin are scaled by."""

    inv_freq: np.ndarray
    attention_scaling: float = 1.0
    #: LongRoPE: the inverse frequencies used once the sequence is longer than
    #: ``threshold`` tokens (``inv_freq`` holds the short ones), as transformers switches
    long_inv_freq: np.ndarray | None = None
    threshold: int = 0

    def tables(self, positions: int, long: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``cos``, ``sin`` of shape ``(positions, rotary_dim / 2)`` in float32, computed as
        transformers does (f32 outer product, then cos/sin, then the scaling); ``long``:
        LongRoPE's long-context table."""
        inv = self.long_inv_freq if long else self.inv_freq
        pos = np.arange(positions, dtype=np.float32)
        freqs = np.outer(pos, inv.astype(np.float32)).astype(np.float32)
        cos = (np.cos(freqs) * np.float32(self.attention_scaling)).astype(np.float32)
        sin = (np.sin(freqs) * np.float32(self.attention_scaling)).astype(np.float32)
        return cos, sin


@dataclass
class Decoder:
    arch: str
    family: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    eps: float
    activation: str  # "silu" | "gelu_tanh"
    context: int
    scale: float
    qkv_bias: bool = False
    qk_norm: bool = False
    sandwich: bool = False  # gemma2/3: norms after attention and around the MLP
    norm_offset: bool = False  # gemma: x * (1 + w)
    embed_scale: float | None = None
    attn_softcap: float = 0.0
    final_softcap: float | None = None
    fused_qkv: bool = False  # phi3 stores qkv_proj
    fused_gate_up: bool = False  # phi3 stores gate_up_proj
    tied: bool = False
    windows: list[int | None] = field(default_factory=list)  # per layer, HF's sliding_window
    layer_rope: list[str] = field(default_factory=list)  # per layer: key of ropes
    ropes: dict[str, Rope] = field(default_factory=dict)

    @property
    def q_size(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.kv_heads * self.head_dim


def make_rope(arch: str, params: dict[str, Any], rotary_dim: int, config: dict[str, Any]) -> Rope:
    """Inverse frequencies for the rope types the builder supports (default, linear,
    dynamic below its threshold, llama3, yarn, longrope), by transformers' formulas."""
    base = float(params.get("rope_theta", 10000.0))
    kind = str(params.get("rope_type") or "default")
    exps = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rotary_dim)
    inv = (1.0 / (np.float32(base) ** exps)).astype(np.float32)
    if kind in ("default", "dynamic"):
        return Rope(inv)
    factor = float(params.get("factor", 1.0))
    if kind == "linear":
        return Rope((inv / np.float32(factor)).astype(np.float32))
    if kind == "llama3":
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old = float(params["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = (2 * math.pi / inv).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv / np.float32(factor), inv).astype(np.float32)
        smooth = ((old / wavelen - low) / (high - low)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return Rope(np.where(medium, smoothed, scaled).astype(np.float32))
    if kind == "yarn":
        old = float(params.get("original_max_position_embeddings")
                    or config.get("max_position_embeddings"))
        beta_fast, beta_slow = float(params.get("beta_fast", 32)), float(params.get("beta_slow", 1))
        mscale = params.get("attention_factor")
        if mscale is None:
            mscale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

        def correction(rot: float) -> float:
            return (rotary_dim * math.log(old / (rot * 2 * math.pi))) / (2 * math.log(base))

        lo = max(math.floor(correction(beta_fast)), 0)
        hi = min(math.ceil(correction(beta_slow)), rotary_dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = np.clip((np.arange(rotary_dim // 2, dtype=np.float32) - lo) / (hi - lo), 0, 1)
        extrapolation = 1 - ramp.astype(np.float32)
        pos_freqs = np.float32(base) ** exps
        inter, extra = 1.0 / (factor * pos_freqs), 1.0 / pos_freqs
        inv = (inter * (1 - extrapolation) + extra * extrapolation).astype(np.float32)
        return Rope(inv, float(mscale))
    if kind == "longrope":
        original = int(params.get("original_max_position_embeddings")
                       or config.get("original_max_position_embeddings") or config["max_position_embeddings"])
        factor = float(params.get("factor") or int(config["max_position_embeddings"]) / original)
        scale = params.get("attention_factor")
        if scale is None:
            scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        base_freqs = np.float32(base) ** exps

        def scaled(ext: Any) -> np.ndarray:
            return (1.0 / (np.asarray(ext, np.float32) * base_freqs)).astype(np.float32)
        return Rope(scaled(params["short_factor"]), float(scale),
                    long_inv_freq=scaled(params["long_factor"]), threshold=original)
    raise ConvcoreError(f"onnx: {arch}: rope type {kind!r} is not built directly; "
                        "use -O path=export")


def decoder_for(arch: str, config: dict[str, Any]) -> Decoder:
    """The :class:`Decoder` of an HF config the builder supports."""
    family = BUILDER_ARCHS.get(arch)
    if family is None:
        raise ConvcoreError(f"onnx: the builder does not know {arch!r}")
    c = config
    try:
        hidden = int(c["hidden_size"])
        heads = int(c["num_attention_heads"])
        layers = int(c["num_hidden_layers"])
        vocab = int(c["vocab_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConvcoreError(f"onnx: config.json lacks {exc}") from None
    kv_heads = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or hidden // heads)
    act = str(c.get("hidden_activation") or c.get("hidden_act") or "silu")
    activation = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_new": "gelu_tanh", "gelu": "gelu"}.get(act)
    if activation is None:
        raise ConvcoreError(f"onnx: {arch}: activation {act!r} is not built directly; use -O path=export")
    gemma = family == "gemma"
    scale = head_dim ** -0.5
    if c.get("query_pre_attn_scalar"):
        scale = float(c["query_pre_attn_scalar"]) ** -0.5
    d = Decoder(
        arch=arch, family=family, hidden=hidden, heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, layers=layers, vocab=vocab, eps=float(c.get("rms_norm_eps", 1e-6)),
        activation=activation, context=int(c.get("max_position_embeddings") or 4096), scale=scale,
        qkv_bias=bool(c.get("attention_bias")) or arch == "qwen2",
        qk_norm=arch in ("qwen3", "gemma3_text"), sandwich=arch in ("gemma2", "gemma3_text"),
        norm_offset=gemma, embed_scale=math.sqrt(hidden) if gemma else None,
        attn_softcap=float(c.get("attn_logit_softcapping") or 0.0) if arch == "gemma2" else 0.0,
        final_softcap=(float(c["final_logit_softcapping"]) if c.get("final_logit_softcapping")
                       and arch == "gemma2" else None),
        fused_qkv=arch == "phi3", fused_gate_up=arch == "phi3",
        tied=bool(c.get("tie_word_embeddings", gemma)),
    )
    if arch == "gemma3_text" and c.get("final_logit_softcapping"):
        d.final_softcap = float(c["final_logit_softcapping"])
    if c.get("mlp_bias"):
        raise ConvcoreError(f"onnx: {arch}: mlp_bias is not built directly; use -O path=export")
    # sliding windows and rope tables per layer, as transformers derives them when the
    # config leaves them implicit (Gemma-2/3's patterns, Gemma-3's two rope bases)
    window = c.get("sliding_window")
    types = hfconfig.layer_types(c, arch)
    d.windows = [int(window) if t == "sliding_attention" and window else None for t in types]
    partial = float(hfconfig.rope_parameters(c, "full_attention", arch).get("partial_rotary_factor")
                    or 1.0)
    rotary_dim = int(head_dim * partial)
    full = hfconfig.rope_parameters(c, "full_attention", arch)
    full.pop("partial_rotary_factor", None)
    for t in types:
        params = hfconfig.rope_parameters(c, t, arch)
        params.pop("partial_rotary_factor", None)
        key = "global" if params == full else "local"
        if key not in d.ropes:
            d.ropes[key] = make_rope(arch, params, rotary_dim, c)
        d.layer_rope.append(key)
    return d


def layer_names(d: Decoder, i: int) -> dict[str, str]:
    """HF names of layer ``i``'s tensors, by slot."""
    p = f"model.layers.{i}."
    names = {"input_norm": p + "input_layernorm.weight", "o": p + "self_attn.o_proj.weight",
             "down": p + "mlp.down_proj.weight"}
    if d.fused_qkv:
        names["qkv"] = p + "self_attn.qkv_proj.weight"
    else:
        names.update(q=p + "self_attn.q_proj.weight", k=p + "self_attn.k_proj.weight",
                     v=p + "self_attn.v_proj.weight")
    if d.qkv_bias:
        names.update(q_bias=p + "self_attn.q_proj.bias", k_bias=p + "self_attn.k_proj.bias",
                     v_bias=p + "self_attn.v_proj.bias")
    if d.qk_norm:
        names.update(q_norm=p + "self_attn.q_norm.weight", k_norm=p + "self_attn.k_norm.weight")
    if d.fused_gate_up:
        names["gate_up"] = p + "mlp.gate_up_proj.weight"
    else:
        names.update(gate=p + "mlp.gate_proj.weight", up=p + "mlp.up_proj.weight")
    if d.sandwich:
        names.update(post_attn_norm=p + "post_attention_layernorm.weight",
                     pre_ffn_norm=p + "pre_feedforward_layernorm.weight",
                     post_ffn_norm=p + "post_feedforward_layernorm.weight")
    else:
        names["post_attn_norm"] = p + "post_attention_layernorm.weight"
    return names
