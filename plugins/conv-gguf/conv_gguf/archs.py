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
    """rope_theta from a v4 (``rope_theta``) or v5 (``rope_parameters``) config."""
    if config.get("rope_theta") is not None:
        return float(config["rope_theta"])
    params = config.get("rope_parameters") or {}
    if layer_type in params and isinstance(params[layer_type], dict):
        params = params[layer_type]
    theta = params.get("rope_theta")
    return float(theta) if theta is not None else None


def rope_type(config: dict[str, Any], layer_type: str = "full_attention") -> str:
    """HF rope type ("default", "linear", "llama3", "yarn", ...)."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if layer_type in params and isinstance(params[layer_type], dict):
        params = params[layer_type]
    return str(params.get("rope_type") or params.get("type") or "default")


def rope_factor(config: dict[str, Any]) -> float | None:
    """The factor of linear rope scaling, or None."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]
    return float(params["factor"]) if rope_type(config) == "linear" and "factor" in params else None


SUPPORTED_ROPE = ("default", "linear")


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
    ("rope.scaling.type", lambda c: "linear" if rope_factor(c) else None, "str", None),
    ("rope.scaling.factor", rope_factor, "f32", None),
)
SOFTCAP_HPARAMS = (
    ("attn_logit_softcapping", _cfg("attn_logit_softcapping"), "f32", "attn_logit_softcapping"),
    ("final_logit_softcapping", _cfg("final_logit_softcapping"), "f32", "final_logit_softcapping"),
)
SLIDING_HPARAMS = (
    ("attention.sliding_window", _cfg("sliding_window"), "u32", "sliding_window"),
)
PHI3_HPARAMS = (
    ("rope.scaling.original_context_length", _cfg("original_max_position_embeddings"), "u32",
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


def _gemma3_config(kv: dict[str, Any], config: dict[str, Any]) -> None:
    # llama.cpp hard-codes the local (sliding) rope base of Gemma 3 to 10000
    full = {k: v for k, v in config["rope_parameters"].items() if k != "partial_rotary_factor"}
    config["rope_parameters"] = {"full_attention": full,
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
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
              COMMON_HPARAMS + SOFTCAP_HPARAMS + SLIDING_HPARAMS, norm_offset=1.0,
              required=("attention.sliding_window",), config_defaults=_GEMMA_DEFAULTS,
              read_config=_gemma_query_scale(46), tokenizer_class="GemmaTokenizer")
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
    Arch("gemma", "gemma", "GemmaForCausalLM", BASE_NAMES, norm_offset=1.0,
         config_defaults=_GEMMA_DEFAULTS, tokenizer_class="GemmaTokenizer"),
    GEMMA2,
    dataclasses.replace(GEMMA2, model_type="gemma3_text", gguf_arch="gemma3",
                        hf_class="Gemma3ForCausalLM",
                        names={**BASE_NAMES, **SANDWICH_NORM_NAMES, **QK_NORM_NAMES},
                        read_config=_gemma3_config),
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
