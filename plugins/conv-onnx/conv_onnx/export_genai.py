"""``genai_config.json``: what onnxruntime-genai reads to run a decoder directory.

Written the way onnxruntime-genai's own model builder writes it (its
``make_genai_config`` and ``resolve_special_token_ids``): the decoder's input and output
names, the attention geometry, the special token ids and the ``search`` defaults, with
``generation_config.json`` overriding the search defaults it sets. Nothing here depends on
how the graph was made, so the builder path and the torch export path share it.
"""
from __future__ import annotations

from typing import Any

# model types onnxruntime-genai 0.18 knows as decoder-only LLMs (names from its library);
# any other decoder is declared as the generic "decoder" type
GENAI_DECODER_TYPES = frozenset({
    "chatglm", "decoder", "ernie4_5", "gemma", "gemma2", "gemma3_text", "gpt2", "gptoss",
    "granite", "internlm2", "lfm2", "llama", "mistral", "nemotron", "olmo", "phi", "phi3",
    "phi3small", "phimoe", "qwen2", "qwen3", "smollm3",
})

# the builder's search defaults; generation_config.json values replace these
SEARCH_DEFAULTS: dict[str, Any] = {
    "diversity_penalty": 0.0,
    "do_sample": False,
    "early_stopping": True,
    "length_penalty": 1.0,
    "min_length": 0,
    "no_repeat_ngram_size": 0,
    "num_beams": 1,
    "num_return_sequences": 1,
    "repetition_penalty": 1.0,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
}
_SEARCH_FROM_GENERATION = ("diversity_penalty", "do_sample", "length_penalty", "no_repeat_ngram_size",
                           "num_beams", "num_return_sequences", "repetition_penalty", "temperature",
                           "top_k", "top_p")


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The decoder's own settings: ``text_config`` of a multimodal config merged over the
    top level (so ids set only at the top still count)."""
    inner = config.get("text_config")
    if isinstance(inner, dict):
        return {**config, **inner}
    return config


def _first(*values: Any) -> Any:
    for value in values:
        if value is not None:
            return value
    return None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def context_length(config: dict[str, Any]) -> int:
    cfg = text_config(config)
    value = _first(cfg.get("seq_length"), cfg.get("max_position_embeddings"), cfg.get("n_positions"),
                   cfg.get("max_sequence_length"), cfg.get("n_ctx"))
    if value is None:
        raise ValueError("config has no max_position_embeddings (or seq_length/n_positions): "
                         "cannot set genai context_length")
    return int(value)


def genai_config_for(
    config: dict[str, Any],
    generation_config: dict[str, Any] | None,
    *,
    inputs: dict[str, str],
    outputs: dict[str, str],
    share_buffer: bool,
    filename: str = "model.onnx",
    model_type: str | None = None,
    head_size: int | None = None,
    num_key_value_heads: int | None = None,
    num_hidden_layers: int | None = None,
    turn_end_id: int | None = None,
    provider_options: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The ``genai_config.json`` dict for a decoder-only model.

    ``config`` is the HF config.json dict, ``generation_config`` the
    generation_config.json dict (or None). ``inputs``/``outputs`` map genai's keys to the
    graph's names, e.g. ``{"input_ids": "input_ids", "attention_mask": "attention_mask",
    "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
    "past_value_names": "past_key_values.%d.value"}`` and ``{"logits": "logits",
    "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}``.
    ``share_buffer`` is ``past_present_share_buffer``: True only for graphs whose present
    outputs alias a max-length past buffer (GroupQueryAttention), False for graphs whose
    present is past + new tokens.

    ``model_type`` (default: config's model_type when genai knows it, else "decoder"),
    ``head_size``, ``num_key_value_heads`` and ``num_hidden_layers`` override what the
    config says (pass what the graph really has). ``turn_end_id`` is the tokenizer's eos
    token, added to the eos ids as the builder does when config.json lacks it.
    """
    cfg = text_config(config)
    gen = dict(generation_config or {})
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(_first(num_key_value_heads, cfg.get("num_key_value_heads"),
                          cfg.get("multi_query_group_num"), heads))
    head = int(_first(head_size, cfg.get("head_dim"), hidden // heads))
    layers = int(_first(num_hidden_layers, cfg.get("num_hidden_layers"), cfg.get("num_layers"),
                        cfg.get("n_layer")))
    ctx = context_length(config)

    bos = _first(gen.get("bos_token_id"), cfg.get("bos_token_id"))
    eos_ids = _ids(_first(gen.get("eos_token_id"), cfg.get("eos_token_id")))
    if not eos_ids:
        raise ValueError("no eos_token_id in config.json or generation_config.json")
    if turn_end_id is not None and int(turn_end_id) not in eos_ids:
        eos_ids = [int(turn_end_id), *eos_ids]
    pad = _first(gen.get("pad_token_id"), cfg.get("pad_token_id"))
    pad = _ids(pad)[0] if pad is not None else eos_ids[0]
    if model_type is None:
        mt = str(cfg.get("model_type") or "")
        model_type = mt if mt in GENAI_DECODER_TYPES else "decoder"

    search = dict(SEARCH_DEFAULTS)
    for key in _SEARCH_FROM_GENERATION:
        if gen.get(key) is not None:
            search[key] = gen[key]
    search["max_length"] = ctx
    search["past_present_share_buffer"] = bool(share_buffer)
    search = dict(sorted(search.items()))

    return {
        "model": {
            "bos_token_id": int(bos) if bos is not None else 1,
            "context_length": ctx,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai",
                                    "provider_options": list(provider_options or [])},
                "filename": filename,
                "head_size": head,
                "hidden_size": hidden,
                "inputs": dict(inputs),
                "outputs": dict(outputs),
                "num_attention_heads": heads,
                "num_hidden_layers": layers,
                "num_key_value_heads": kv_heads,
            },
            "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
            "pad_token_id": int(pad),
            "type": model_type,
            "vocab_size": int(cfg["vocab_size"]),
        },
        "search": search,
    }
