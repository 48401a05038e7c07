"""What llama.cpp expects of each architecture, as tables.

Each :class:`Arch` says which GGUF architecture an HF ``model_type`` becomes, how its
tensors are renamed, which weights are transformed on the way (llama's rotary
permutation of q/k, Gemma's ``1 + w`` norms), and which hyper-parameters are written
under which key. The reader uses the same tables backwards.

These are the built-in entries (:data:`BUILTIN_ARCHS`); the table in use is whatever the
loaded plugins register through ``conv_gguf_register_archs`` (see ``arch_table.py``).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import numpy as np

from convcore import hfconfig

from . import rope

# HF module path -> GGUF tensor name; ".weight"/".bias" are carried over unchanged.
BASE_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "model.layers.{bid}.input_layernorm": "blk.{bid}.attn_norm",
    "model.layers.{bid}.self_attn.q_proj": "blk.{bid}.attn_q",
    "model.layers.{bid}.self_attn.k_proj": "blk.{bid}.attn_k",
    "model.layers.{bid}.self_attn.v_proj": "blk.{bid}.attn_v",
    "model.layers.{bid}.self_attn.o_proj": "blk.{bid}.attn_output",
    "model.layers.{bid}.post_attention_layernorm": "blk.{bid}.ffn_norm",
    "model.layers.{bid}.mlp.gate_proj": "blk.{bid}.ffn_gate",
    "model.layers.{bid}.mlp.up_proj": "blk.{bid}.ffn_up",
    "model.layers.{bid}.mlp.down_proj": "blk.{bid}.ffn_down",
}
QK_NORM_NAMES = {
    "model.layers.{bid}.self_attn.q_norm": "blk.{bid}.attn_q_norm",
    "model.layers.{bid}.self_attn.k_norm": "blk.{bid}.attn_k_norm",
}
# Gemma 2/3 have four norms per block; the HF post-attention norm is a real post-norm.
SANDWICH_NORM_NAMES = {
    "model.layers.{bid}.post_attention_layernorm": "blk.{bid}.post_attention_norm",
    "model.layers.{bid}.pre_feedforward_layernorm": "blk.{bid}.ffn_norm",
    "model.layers.{bid}.post_feedforward_layernorm": "blk.{bid}.post_ffw_norm",
}
# Phi-3 keeps q/k/v and gate/up fused; llama.cpp splits them at load time.
PHI3_NAMES = {
    "model.layers.{bid}.self_attn.qkv_proj": "blk.{bid}.attn_qkv",
    "model.layers.{bid}.mlp.gate_up_proj": "blk.{bid}.ffn_up",
}
# Mixture of experts: each layer's experts are stacked into one 3-D GGUF tensor per
# projection (llama.cpp's converter's names and order), the router is ffn_gate_inp.
_DENSE_MLP = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_NAMES = {**{k: v for k, v in BASE_NAMES.items() if not k.endswith(_DENSE_MLP)},
                 "model.layers.{bid}.block_sparse_moe.gate": "blk.{bid}.ffn_gate_inp"}
MIXTRAL_EXPERTS = {   # w1, w2, w3: the order llama.cpp's converter emits them in
    "model.layers.{bid}.block_sparse_moe.experts.{xid}.w1": "blk.{bid}.ffn_gate_exps",
    "model.layers.{bid}.block_sparse_moe.experts.{xid}.w2": "blk.{bid}.ffn_down_exps",
    "model.layers.{bid}.block_sparse_moe.experts.{xid}.w3": "blk.{bid}.ffn_up_exps",
}
QWEN_MOE_NAMES = {**{k: v for k, v in BASE_NAMES.items() if not k.endswith(_DENSE_MLP)},
                  "model.layers.{bid}.mlp.gate": "blk.{bid}.ffn_gate_inp"}
QWEN_MOE_EXPERTS = {  # down, gate, up: the order llama.cpp's converter emits them in
    "model.layers.{bid}.mlp.experts.{xid}.down_proj": "blk.{bid}.ffn_down_exps",
    "model.layers.{bid}.mlp.experts.{xid}.gate_proj": "blk.{bid}.ffn_gate_exps",
    "model.layers.{bid}.mlp.experts.{xid}.up_proj": "blk.{bid}.ffn_up_exps",
}
QWEN2_SHARED_EXPERT = {
    "model.layers.{bid}.mlp.shared_expert.gate_proj": "blk.{bid}.ffn_gate_shexp",
    "model.layers.{bid}.mlp.shared_expert.up_proj": "blk.{bid}.ffn_up_shexp",
    "model.layers.{bid}.mlp.shared_expert.down_proj": "blk.{bid}.ffn_down_shexp",
    "model.layers.{bid}.mlp.shared_expert_gate": "blk.{bid}.ffn_gate_inp_shexp",
}
# More dense families, as gguf-py's tensor map names them
OLMO2_NAMES = {**{k: v for k, v in BASE_NAMES.items() if "layernorm" not in k}, **QK_NORM_NAMES,
               "model.layers.{bid}.post_attention_layernorm": "blk.{bid}.post_attention_norm",
               "model.layers.{bid}.post_feedforward_layernorm": "blk.{bid}.post_ffw_norm"}
STARCODER2_NAMES = {**{k: v for k, v in BASE_NAMES.items() if not k.endswith(_DENSE_MLP)},
                    "model.layers.{bid}.mlp.c_fc": "blk.{bid}.ffn_up",
                    "model.layers.{bid}.mlp.c_proj": "blk.{bid}.ffn_down"}
PHI2_NAMES = {"model.embed_tokens": "token_embd", "model.final_layernorm": "output_norm",
              "lm_head": "output", "model.layers.{bid}.input_layernorm": "blk.{bid}.attn_norm",
              "model.layers.{bid}.self_attn.q_proj": "blk.{bid}.attn_q",
              "model.layers.{bid}.self_attn.k_proj": "blk.{bid}.attn_k",
              "model.layers.{bid}.self_attn.v_proj": "blk.{bid}.attn_v",
              "model.layers.{bid}.self_attn.dense": "blk.{bid}.attn_output",
              "model.layers.{bid}.mlp.fc1": "blk.{bid}.ffn_up",
              "model.layers.{bid}.mlp.fc2": "blk.{bid}.ffn_down"}
# BERT encoders (llama.cpp's BertModel; names as gguf-py's tensor_mapping has them):
# BertModel checkpoints name their modules without a prefix, BertForMaskedLM /
# BertForPreTraining ones under "bert."; the unprefixed names come last so that files
# read back as a BertModel.
_BERT_MODULES = {
    "embeddings.word_embeddings": "token_embd",
    "embeddings.token_type_embeddings": "token_types",
    "embeddings.position_embeddings": "position_embd",
    "embeddings.LayerNorm": "token_embd_norm",
    "encoder.layer.{bid}.attention.self.query": "blk.{bid}.attn_q",
    "encoder.layer.{bid}.attention.self.key": "blk.{bid}.attn_k",
    "encoder.layer.{bid}.attention.self.value": "blk.{bid}.attn_v",
    "encoder.layer.{bid}.attention.output.dense": "blk.{bid}.attn_output",
    "encoder.layer.{bid}.attention.output.LayerNorm": "blk.{bid}.attn_output_norm",
    "encoder.layer.{bid}.intermediate.dense": "blk.{bid}.ffn_up",
    "encoder.layer.{bid}.output.dense": "blk.{bid}.ffn_down",
    "encoder.layer.{bid}.output.LayerNorm": "blk.{bid}.layer_output_norm",
}
BERT_NAMES = {**{f"bert.{hf}": gg for hf, gg in _BERT_MODULES.items()}, **_BERT_MODULES}
# What llama.cpp's converter leaves out of a BERT GGUF: it only embeds, so the pooler and
# the pre-training heads (masked-LM, next-sentence) go, as do the position ids buffer.
BERT_DROPPED = (r"(bert\.)?embeddings\.position_ids", r"(bert\.)?pooler\.dense\.(weight|bias)",
                r"cls\.predictions\..*", r"cls\.seq_relationship\..*")


def rope_theta(config: dict[str, Any], layer_type: str = "full_attention") -> float | None:
    """rope_theta as transformers reads it (v4 or v5 config, the family's default base
    where the config has none); None when the config says nothing of rope and the
    family has no default of its own (llama.cpp then uses its own, 10000)."""
    said = any(config.get(k) is not None for k in ("rope_theta", "rope_parameters", "rope_scaling"))
    if not said and not str(config.get("model_type", "")).startswith("gemma3"):
        return None
    return hfconfig.rope_parameters(config, layer_type)["rope_theta"]


def head_dim(config: dict[str, Any]) -> int:
    """Per-head width (HF's head_dim, else hidden / heads)."""
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def rotary_dim(config: dict[str, Any]) -> int:
    """How many dimensions of each head are rotated (Phi-3's partial_rotary_factor)."""
    params = config.get("rope_parameters") or {}
    factor = config.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0)) or 1.0
    return int(head_dim(config) * factor)


def _cfg(key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda c: c.get(key)


# (GGUF key below "{arch}.", value from the HF config, GGUF value type, HF config key or None)
# The last column lets the reader rebuild config.json; None = derived, handled in reader.
COMMON_HPARAMS: tuple[tuple[str, Callable[[dict], Any], str, str | None], ...] = (
    ("context_length", _cfg("max_position_embeddings"), "u32", "max_position_embeddings"),
    ("embedding_length", _cfg("hidden_size"), "u32", "hidden_size"),
    ("block_count", _cfg("num_hidden_layers"), "u32", "num_hidden_layers"),
    ("feed_forward_length", _cfg("intermediate_size"), "u32", "intermediate_size"),
    ("attention.head_count", _cfg("num_attention_heads"), "u32", "num_attention_heads"),
    ("attention.head_count_kv",
     lambda c: c.get("num_key_value_heads") or c["num_attention_heads"], "u32", "num_key_value_heads"),
    ("attention.layer_norm_rms_epsilon", _cfg("rms_norm_eps"), "f32", "rms_norm_eps"),
    ("attention.key_length", head_dim, "u32", "head_dim"),
    ("attention.value_length", head_dim, "u32", None),
    ("rope.freq_base", rope_theta, "f32", None),
    ("rope.dimension_count", rotary_dim, "u32", None),
    ("vocab_size", _cfg("vocab_size"), "u32", "vocab_size"),
    *rope.HPARAMS,
)
def gemma_hparams(rows: tuple, keep_base: bool) -> tuple:
    """``rows`` as llama.cpp's converter writes them for the Gemma family: no
    ``vocab_size`` (llama.cpp counts the tokens), ``rope.dimension_count`` only when not
    the whole head, and (Gemma 1 and 2, unless ``keep_base``) ``rope.freq_base`` only
    when not llama.cpp's default of 10000: the same file where the model is standard,
    still right where it is not."""
    out = []
    for key, fn, kind, hf in rows:
        if key == "vocab_size":
            continue
        if key == "rope.dimension_count":
            fn = lambda c, f=fn: None if f(c) == head_dim(c) else f(c)   # noqa: E731
        elif key == "rope.freq_base" and not keep_base:
            fn = lambda c, f=fn: None if f(c) == 10000.0 else f(c)   # noqa: E731
        out.append((key, fn, kind, hf))
    return tuple(out)


def _experts(c: dict[str, Any]) -> int | None:
    return c.get("num_local_experts") or c.get("num_experts")


def moe_hparams(count_key: str, shared: bool = False) -> tuple:
    """The expert keys llama.cpp reads; ``count_key`` is the family's HF name for the
    number of experts (Mixtral: num_local_experts, Qwen: num_experts)."""
    rows = [("expert_count", _experts, "u32", count_key),
            ("expert_used_count", _cfg("num_experts_per_tok"), "u32", "num_experts_per_tok"),
            ("expert_feed_forward_length", _cfg("moe_intermediate_size"), "u32", "moe_intermediate_size")]
    if shared:
        rows.append(("expert_shared_feed_forward_length", _cfg("shared_expert_intermediate_size"),
                     "u32", "shared_expert_intermediate_size"))
    return tuple(rows)


def _moe_problem(norm_topk: bool):
    """What llama.cpp's Qwen MoE graphs cannot compute: a dense layer among the sparse
    ones, or top-k weights normalized otherwise than the family always does."""
    def problem(c: dict[str, Any]) -> str | None:
        if c.get("mlp_only_layers") or int(c.get("decoder_sparse_step") or 1) != 1:
            return "dense layers among the expert layers (mlp_only_layers / decoder_sparse_step)"
        if bool(c.get("norm_topk_prob", norm_topk)) != norm_topk:
            return (f"norm_topk_prob={c.get('norm_topk_prob')} (llama.cpp's {c.get('model_type')} "
                    f"{'always' if norm_topk else 'never'} normalizes the top-k weights)")
        return None
    return problem


def _no_window(c: dict[str, Any]) -> str | None:
    return f"sliding_window={c['sliding_window']}" if c.get("sliding_window") else None


def layer_norm_hparams(eps_key: str) -> tuple:
    """COMMON_HPARAMS for LayerNorm families: the epsilon under llama.cpp's LayerNorm key."""
    return tuple(row for row in COMMON_HPARAMS if row[0] != "attention.layer_norm_rms_epsilon") + (
        ("attention.layer_norm_epsilon", _cfg(eps_key), "f32", eps_key),)


GRANITE_HPARAMS = (
    ("attention.scale", _cfg("attention_multiplier"), "f32", "attention_multiplier"),
    ("embedding_scale", _cfg("embedding_multiplier"), "f32", "embedding_multiplier"),
    ("residual_scale", _cfg("residual_multiplier"), "f32", "residual_multiplier"),
    ("logit_scale", _cfg("logits_scaling"), "f32", "logits_scaling"),
)
LN_REQUIRED = tuple(k if k != "attention.layer_norm_rms_epsilon" else "attention.layer_norm_epsilon"
                    for k in ("context_length", "embedding_length", "block_count", "feed_forward_length",
                              "attention.head_count", "attention.layer_norm_rms_epsilon"))


def _smollm3_problem(c: dict[str, Any]) -> str | None:
    # llama.cpp leaves rope out of every 4th layer, whatever the file says
    n = int(c.get("num_hidden_layers") or 0)
    expected = [int((i + 1) % 4 != 0) for i in range(n)]
    said = c.get("no_rope_layers") or [int((i + 1) % int(c.get("no_rope_layer_interval") or 4) != 0)
                                       for i in range(n)]
    return None if list(said) == expected else f"no_rope_layers {list(said)} (llama.cpp: every 4th layer)"


def _phi2_config(kv: dict[str, Any], config: dict[str, Any]) -> None:
    config.pop("head_dim", None)   # PhiConfig derives it; a stray key would not be used


SOFTCAP_HPARAMS = (
    ("attn_logit_softcapping", _cfg("attn_logit_softcapping"), "f32", "attn_logit_softcapping"),
    ("final_logit_softcapping", _cfg("final_logit_softcapping"), "f32", "final_logit_softcapping"),
)
SLIDING_HPARAMS = (
    ("attention.sliding_window", _cfg("sliding_window"), "u32", "sliding_window"),
)
PHI3_HPARAMS = (
    ("rope.scaling.original_context_length", rope.original_context, "u32",
     "original_max_position_embeddings"),
)
# What llama.cpp's converter writes for BERT (TextModel.set_gguf_parameters: no rope, no
# kv heads as BertConfig has none, the LayerNorm epsilon; BertModel: causal = false)
BERT_HPARAMS = (
    ("context_length", _cfg("max_position_embeddings"), "u32", "max_position_embeddings"),
    ("embedding_length", _cfg("hidden_size"), "u32", "hidden_size"),
    ("feed_forward_length", _cfg("intermediate_size"), "u32", "intermediate_size"),
    ("block_count", _cfg("num_hidden_layers"), "u32", "num_hidden_layers"),
    ("attention.head_count", _cfg("num_attention_heads"), "u32", "num_attention_heads"),
    ("attention.layer_norm_epsilon", _cfg("layer_norm_eps"), "f32", "layer_norm_eps"),
    ("attention.causal", lambda c: False, "bool", None),
)


def _gemma_query_scale(big_layers: int) -> Callable[[dict[str, Any], dict[str, Any]], None]:
    """llama.cpp scales Gemma 2/3 queries by 1/sqrt(head_dim), or by 1/sqrt(hidden/heads)
    for the 27B models, which it recognises by their layer count (``big_layers``)."""
    def fill(kv: dict[str, Any], config: dict[str, Any]) -> None:
        big = config.get("num_hidden_layers") == big_layers
        config["query_pre_attn_scalar"] = (config["hidden_size"] // config["num_attention_heads"]
                                           if big else config["head_dim"])
    return fill


def _layer_types(config: dict[str, Any], pattern: int, kv: dict[str, Any] | None = None,
                 arch: str = "") -> None:
    """layer_types: the file's per-layer pattern when it has one, else llama.cpp's default."""
    said = (kv or {}).get(f"{arch}.attention.sliding_window_pattern")
    n = int(config.get("num_hidden_layers") or 0)
    if isinstance(said, (list, tuple)) and len(said) == n:
        config["layer_types"] = ["sliding_attention" if v else "full_attention" for v in said]
        return
    if isinstance(said, int) and not isinstance(said, bool) and said > 0:
        pattern = said
    config["layer_types"] = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]


def _gemma2_config(kv: dict[str, Any], config: dict[str, Any]) -> None:
    _layer_types(config, 2, kv, "gemma2")
    _gemma_query_scale(46)(kv, config)


def _gemma3_config(kv: dict[str, Any], config: dict[str, Any]) -> None:
    # llama.cpp's defaults for Gemma 3: every sixth layer global, the local (sliding) rope
    # base 10000, unless the file says otherwise
    full = {k: v for k, v in config["rope_parameters"].items() if k != "partial_rotary_factor"}
    local = float(kv.get("gemma3.rope.freq_base_swa", 10000.0))
    config["rope_parameters"] = {"full_attention": full,
                                 "sliding_attention": {"rope_type": "default", "rope_theta": local}}
    _layer_types(config, 6, kv, "gemma3")
    _gemma_query_scale(62)(kv, config)


def _phi3_config(kv: dict[str, Any], config: dict[str, Any]) -> None:
    # transformers' Phi3Config defaults differ from what a GGUF without these keys means
    config.setdefault("sliding_window", None)
    config["pad_token_id"] = None


# llama.cpp's pooling types (enum llama_pooling_type), as gguf.PoolingType numbers them
POOLING_TYPES = {"none": 0, "mean": 1, "cls": 2, "last": 3, "rank": 4}
_BERT_DEFAULTS = {"hidden_act": "gelu", "type_vocab_size": 2, "layer_norm_eps": 1e-12}


def _bert_keys(model: Any, config: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """``pooling_type`` as llama.cpp's converter sets it (``_try_set_pooling_type``): from
    the sentence-transformers Pooling module named in modules.json, mean before cls before
    last token; no key when the model has no such module (llama.cpp then pools nothing)."""
    from .companions import pooling_mode
    mode = pooling_mode(model)
    return [] if mode is None else [("pooling_type", POOLING_TYPES[mode], "u32")]


def _bert_config(kv: dict[str, Any], config: dict[str, Any]) -> None:
    # BertConfig's keys that llama.cpp's BERT does not vary: absolute positions, GELU
    config.setdefault("position_embedding_type", "absolute")
    if "tokenizer.ggml.token_type_count" in kv:
        config["type_vocab_size"] = int(kv["tokenizer.ggml.token_type_count"])


REQUIRED_KEYS = ("context_length", "embedding_length", "block_count", "feed_forward_length",
                 "attention.head_count", "attention.layer_norm_rms_epsilon")
# llama.cpp's BERT loader reads these without a default
BERT_REQUIRED = ("context_length", "embedding_length", "block_count", "feed_forward_length",
                 "attention.head_count", "attention.layer_norm_epsilon", "attention.causal")


@dataclass(frozen=True)
class Arch:
    """One HF architecture as llama.cpp sees it: conv-gguf's unit of extension.

    Plugins register instances through the ``conv_gguf_register_archs`` hook
    (see :mod:`conv_gguf.hookspecs`); the writer, reader, validator and name mapping
    look them up by ``model_type`` or ``gguf_arch``.

    :param model_type: the HF ``model_type`` in config.json this entry converts.
    :param gguf_arch: ``general.architecture`` in the GGUF (the prefix of its keys).
    :param hf_class: ``architectures[0]`` of the config.json the reader rebuilds.
    :param names: HF module path -> GGUF tensor name, ``{bid}`` standing for the block
        number; ``.weight`` / ``.bias`` are carried over.
    :param hparams: ``(GGUF key below "{gguf_arch}.", value from the HF config dict,
        GGUF value type "u32"|"f32"|"bool"|"str", HF config key the reader restores or
        None)``; a None value is not written.
    :param permute_qk: llama.cpp's "normal" rope wants each head's q/k rows interleaved.
    :param norm_offset: Gemma stores ``1 + w`` in its norms.
    :param required: keys below ``{gguf_arch}.`` the validator insists on, beyond
        :data:`REQUIRED_KEYS`.
    :param config_defaults: config keys HF leaves to the model class's defaults.
    :param read_config: ``read_config(kv, config)`` completes the config.json the
        reader rebuilds from the GGUF keys with what those keys cannot say.
    :param read_back: GGUFs of ``gguf_arch`` read back as this ``model_type``; exactly
        one registered entry per ``gguf_arch`` may say so. :meth:`alias` clears it.
    :param tokenizer_class: the family's transformers tokenizer class (what its
        checkpoints' tokenizer_config.json names), written by the reader when that class
        tokenizes the GGUF's vocabulary as llama.cpp does (see ``hf_tokenizer.py``);
        None: the generic ``PreTrainedTokenizerFast``, which follows tokenizer.json.
    :param dropped: regexes of HF tensor names llama.cpp's converter leaves out (BERT's
        pooler and pre-training heads); any other tensor without a GGUF name is an error.
    :param encoder: an embedding model (bidirectional, no logits): no rope in the config
        the reader rebuilds, and runtime sessions embed instead of giving logits.
    :param base_required: the keys below ``{gguf_arch}.`` llama.cpp insists on for this
        family (:data:`REQUIRED_KEYS` for decoders); ``required`` adds to them.
    :param extra_keys: ``extra_keys(model, config) -> [(key below "{gguf_arch}.", value,
        type)]`` for keys that come from more than config.json (BERT's pooling type, from
        the sentence-transformers files).
    :param swa_pattern: llama.cpp's default layout for the family: every ``swa_pattern``-th
        layer global, the others sliding (Gemma-2: 2, Gemma-3: 6); a config with other
        ``layer_types`` gets ``attention.sliding_window_pattern`` (per layer, true =
        sliding), and the reader writes the layer types out either way.
    :param experts: HF module path of one expert's projection, with ``{bid}`` and
        ``{xid}`` (the expert number) -> the GGUF name of the 3-D tensor the layer's
        experts are stacked into, in the order llama.cpp's converter writes them.
    :param problem: ``problem(config) -> str | None``: what in a config llama.cpp's graph
        for this family cannot compute (refused in one line), or None.
    """

    model_type: str
    gguf_arch: str
    hf_class: str
    names: dict[str, str]
    hparams: tuple = COMMON_HPARAMS
    permute_qk: bool = False
    norm_offset: float = 0.0
    required: tuple[str, ...] = ()
    config_defaults: dict[str, Any] = field(default_factory=dict)
    read_config: Callable[[dict[str, Any], dict[str, Any]], None] | None = None
    read_back: bool = True
    tokenizer_class: str | None = None
    dropped: tuple[str, ...] = ()
    encoder: bool = False
    base_required: tuple[str, ...] = REQUIRED_KEYS
    extra_keys: Callable[[Any, dict[str, Any]], list[tuple[str, Any, str]]] | None = None
    swa_pattern: int | None = None
    experts: dict[str, str] = field(default_factory=dict)
    problem: Callable[[dict[str, Any]], str | None] | None = None

    def drops(self, hf_name: str) -> bool:
        """Whether llama.cpp's converter leaves the HF tensor ``hf_name`` out."""
        return any(re.fullmatch(p, hf_name) for p in self.dropped)

    def alias(self, model_type: str, hf_class: str | None = None) -> "Arch":
        """This architecture under another HF ``model_type``: written the same way, while
        its GGUFs keep reading back as this one (mistral is llama's alias)."""
        return dataclasses.replace(self, model_type=model_type,
                                   hf_class=hf_class or self.hf_class, read_back=False)


_GEMMA_DEFAULTS = {"hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True}
LLAMA = Arch("llama", "llama", "LlamaForCausalLM", BASE_NAMES, permute_qk=True,
             tokenizer_class="LlamaTokenizer")
GEMMA2 = Arch("gemma2", "gemma2", "Gemma2ForCausalLM", {**BASE_NAMES, **SANDWICH_NORM_NAMES},
              gemma_hparams(COMMON_HPARAMS, False) + SOFTCAP_HPARAMS + SLIDING_HPARAMS, norm_offset=1.0,
              required=("attention.sliding_window",), config_defaults=_GEMMA_DEFAULTS,
              read_config=_gemma2_config, tokenizer_class="GemmaTokenizer", swa_pattern=2)
BERT = Arch("bert", "bert", "BertModel", BERT_NAMES, BERT_HPARAMS, dropped=BERT_DROPPED,
            encoder=True, base_required=BERT_REQUIRED, config_defaults=_BERT_DEFAULTS,
            read_config=_bert_config, extra_keys=_bert_keys, tokenizer_class="BertTokenizer")
# The architectures conv-gguf registers itself (through the same hook as anyone else).
# Mistral is stored as llama, and reads back as llama: both compute the same function.
BUILTIN_ARCHS: Mapping[str, Arch] = MappingProxyType({a.model_type: a for a in (
    LLAMA,
    LLAMA.alias("mistral", "MistralForCausalLM"),
    Arch("qwen2", "qwen2", "Qwen2ForCausalLM", BASE_NAMES, tokenizer_class="Qwen2Tokenizer"),
    Arch("qwen3", "qwen3", "Qwen3ForCausalLM", {**BASE_NAMES, **QK_NORM_NAMES},
         tokenizer_class="Qwen2Tokenizer"),
    Arch("gemma", "gemma", "GemmaForCausalLM", BASE_NAMES, gemma_hparams(COMMON_HPARAMS, False), norm_offset=1.0,
         config_defaults=_GEMMA_DEFAULTS, tokenizer_class="GemmaTokenizer"),
    GEMMA2,
    dataclasses.replace(GEMMA2, model_type="gemma3_text", gguf_arch="gemma3",
                        hf_class="Gemma3ForCausalLM",
                        hparams=gemma_hparams(COMMON_HPARAMS, True) + SOFTCAP_HPARAMS + SLIDING_HPARAMS,
                        names={**BASE_NAMES, **SANDWICH_NORM_NAMES, **QK_NORM_NAMES},
                        read_config=_gemma3_config, swa_pattern=6),
    Arch("olmo2", "olmo2", "Olmo2ForCausalLM", OLMO2_NAMES, tokenizer_class=None),
    Arch("granite", "granite", "GraniteForCausalLM", BASE_NAMES, COMMON_HPARAMS + GRANITE_HPARAMS,
         permute_qk=True),
    Arch("smollm3", "smollm3", "SmolLM3ForCausalLM", BASE_NAMES, permute_qk=True,
         problem=_smollm3_problem),
    Arch("starcoder2", "starcoder2", "Starcoder2ForCausalLM", STARCODER2_NAMES,
         layer_norm_hparams("norm_epsilon"), base_required=LN_REQUIRED,
         config_defaults={"use_bias": True, "hidden_act": "gelu_pytorch_tanh"}),
    Arch("phi", "phi2", "PhiForCausalLM", PHI2_NAMES, layer_norm_hparams("layer_norm_eps"),
         base_required=LN_REQUIRED, config_defaults={"hidden_act": "gelu_new"}, read_config=_phi2_config),
    Arch("mixtral", "llama", "MixtralForCausalLM", MIXTRAL_NAMES,
         COMMON_HPARAMS + moe_hparams("num_local_experts"), permute_qk=True, read_back=False,
         experts=MIXTRAL_EXPERTS, problem=_no_window, tokenizer_class="LlamaTokenizer"),
    Arch("qwen2_moe", "qwen2moe", "Qwen2MoeForCausalLM", {**QWEN_MOE_NAMES, **QWEN2_SHARED_EXPERT},
         COMMON_HPARAMS + moe_hparams("num_experts", shared=True), experts=QWEN_MOE_EXPERTS,
         config_defaults={"norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": []},
         problem=_moe_problem(False), tokenizer_class="Qwen2Tokenizer"),
    Arch("qwen3_moe", "qwen3moe", "Qwen3MoeForCausalLM", {**QWEN_MOE_NAMES, **QK_NORM_NAMES},
         COMMON_HPARAMS + moe_hparams("num_experts"), experts=QWEN_MOE_EXPERTS,
         config_defaults={"norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []},
         problem=_moe_problem(True), tokenizer_class="Qwen2Tokenizer"),
    Arch("phi3", "phi3", "Phi3ForCausalLM", {**BASE_NAMES, **PHI3_NAMES},
         COMMON_HPARAMS + SLIDING_HPARAMS + PHI3_HPARAMS, read_config=_phi3_config,
         tokenizer_class="LlamaTokenizer"),
    BERT,
)})


def _compile(names: dict[str, str]) -> list[tuple[re.Pattern, str]]:
    out = []
    for hf, gg in names.items():
        pattern = re.escape(hf).replace(r"\{bid\}", r"(?P<bid>\d+)")
        out.append((re.compile(pattern + r"\.(?P<suffix>weight|bias|gamma|beta)$"), gg))
    return out


# old (TF-converted) checkpoints call LayerNorm parameters gamma and beta, as transformers
# and llama.cpp's converter both still accept
_SUFFIX = {"gamma": "weight", "beta": "bias"}


def map_name(arch: Arch, hf_name: str) -> str | None:
    """GGUF name of an HF tensor, or None when llama.cpp has no use for it."""
    for pattern, gg in _compile(arch.names):
        m = pattern.match(hf_name)
        if m:
            bid = m.groupdict().get("bid")
            suffix = m.group("suffix")
            return gg.replace("{bid}", bid or "") + "." + _SUFFIX.get(suffix, suffix)
    return None


def unmap_name(arch: Arch, gguf_name: str) -> str | None:
    """HF name of a GGUF tensor (the inverse of :func:`map_name`)."""
    inverse = {gg: hf for hf, gg in arch.names.items()}
    return map_name(dataclasses.replace(arch, names=inverse), gguf_name)


def _expert_patterns(arch: Arch) -> list[tuple[re.Pattern, str]]:
    out = []
    for hf, gg in arch.experts.items():
        pattern = re.escape(hf).replace(r"\{bid\}", r"(?P<bid>\d+)").replace(r"\{xid\}", r"(?P<xid>\d+)")
        out.append((re.compile(pattern + r"\.weight$"), gg))
    return out


def map_expert(arch: Arch, hf_name: str) -> tuple[str, int] | None:
    """(GGUF name of the stacked tensor, expert number) of one expert's HF weight, or None."""
    for pattern, gg in _expert_patterns(arch):
        m = pattern.match(hf_name)
        if m:
            return gg.replace("{bid}", m.group("bid")) + ".weight", int(m.group("xid"))
    return None


def unmap_expert(arch: Arch, gguf_name: str, n_expert: int) -> list[str] | None:
    """The HF names of the experts stacked in GGUF tensor ``gguf_name``, in order, or None
    when it is not a stacked expert tensor."""
    for hf, gg in arch.experts.items():
        m = re.fullmatch(re.escape(gg).replace(r"\{bid\}", r"(?P<bid>\d+)") + r"\.weight", gguf_name)
        if m:
            base = hf.replace("{bid}", m.group("bid"))
            return [base.replace("{xid}", str(x)) + ".weight" for x in range(n_expert)]
    return None


# weight transforms ------------------------------------------------------------------------
def permute_rows(w: np.ndarray, n_head: int, inverse: bool = False) -> np.ndarray:
    """HF keeps each head's rotary pairs in two halves; llama.cpp's "normal" rope wants
    them interleaved. Reorders the rows of a q/k weight (or bias) per head."""
    rows = w.shape[0]
    half = rows // n_head // 2
    shape = (n_head, 2, half) if not inverse else (n_head, half, 2)
    return w.reshape(*shape, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def transform(arch: Arch, config: dict[str, Any], gguf_name: str, inverse: bool = False
              ) -> Callable[[np.ndarray], np.ndarray] | None:
    """The function that turns an HF array into the GGUF array (or back with ``inverse``),
    or None when the tensor is copied unchanged."""
    if arch.permute_qk and re.search(r"\.attn_[qk]\.(weight|bias)$", gguf_name):
        heads = config["num_attention_heads"] if ".attn_q." in gguf_name else (
            config.get("num_key_value_heads") or config["num_attention_heads"])
        def reorder(w: np.ndarray) -> np.ndarray:
            return permute_rows(w, heads, inverse)
        reorder.rows_only = True  # moves whole rows: works on any dtype  # type: ignore[attr-defined]
        return reorder
    if arch.norm_offset and gguf_name.endswith("norm.weight"):
        offset = -arch.norm_offset if inverse else arch.norm_offset
        return lambda w: (w.astype(np.float32) + np.float32(offset))
    return None
