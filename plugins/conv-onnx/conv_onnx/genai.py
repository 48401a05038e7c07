"""``genai_config.json``: what onnxruntime-genai needs to run the graph (names of the
decoder's inputs and outputs, attention sizes, special tokens, search defaults)."""
from __future__ import annotations

from typing import Any

from convcore import Model

from .archs import GENAI_TYPES, Decoder


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value else value


def genai_config(model: Model, d: Decoder, context: int, *, dtype: str,
                 position_ids: bool = False, share_buffer: bool = True) -> dict[str, Any]:
    """The config for a decoder graph with the builder's input and output names."""
    config = model.config
    gen = model.metadata.get("generation_config") or {}
    eos = gen.get("eos_token_id", config.get("eos_token_id"))
    bos = gen.get("bos_token_id", config.get("bos_token_id"))
    pad = gen.get("pad_token_id", config.get("pad_token_id"))
    if pad is None:
        pad = _first(eos)
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if position_ids:
        inputs["position_ids"] = "position_ids"
    inputs.update(past_key_names="past_key_values.%d.key", past_value_names="past_key_values.%d.value")
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": "model.onnx", "head_size": d.head_dim, "hidden_size": d.hidden,
        "inputs": inputs,
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
        "num_attention_heads": d.heads, "num_hidden_layers": d.layers,
        "num_key_value_heads": d.kv_heads,
    }
    out: dict[str, Any] = {"bos_token_id": bos, "context_length": context, "decoder": decoder,
                           "eos_token_id": eos, "pad_token_id": pad,
                           "type": GENAI_TYPES.get(d.arch, d.arch), "vocab_size": d.vocab}
    out = {k: v for k, v in out.items() if v is not None}
    search = {
        "diversity_penalty": 0.0, "do_sample": bool(gen.get("do_sample", False)),
        "early_stopping": True, "length_penalty": 1.0, "max_length": context, "min_length": 0,
        "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
        "past_present_share_buffer": share_buffer,
        "repetition_penalty": float(gen.get("repetition_penalty", 1.0)),
        "temperature": float(gen.get("temperature", 1.0)), "top_k": int(gen.get("top_k", 50)),
        "top_p": float(gen.get("top_p", 1.0)),
    }
    return {"model": out, "search": search}
