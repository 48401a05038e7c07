"""The language model inside an image-text checkpoint.

Gemma-3 4B/12B/27B, Mistral-3 (Mistral-Small-3.1) and LLaVA-style models are published as
``*ForConditionalGeneration``: a vision tower, a projector and a language model whose
config sits in ``text_config``. Formats whose runtimes take only the language model
(writers for llama.cpp, mlx-lm, onnxruntime-genai) call :func:`text_model` and convert
that, as its text family (``gemma3_text``, ``mistral``, ``llama``), saying in one line
what was left out. Text-only input computes the same logits through either model.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any

from .model import Model

#: HF model_type of the image-text checkpoints handled here
IMAGE_TEXT = ("gemma3", "mistral3", "llava")
#: the causal-LM class of each text family, for the config written beside the weights
TEXT_CLASSES = {"gemma3_text": "Gemma3ForCausalLM", "mistral": "MistralForCausalLM",
                "llama": "LlamaForCausalLM", "ministral": "MinistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM"}
# Checkpoints saved before transformers 4.52 (and by 5.x's save_pretrained) prefix the
# language model with "language_model."; later ones with "model.language_model.".
_RENAMES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
            ("model.language_model.", "model."), ("lm_head.", "lm_head."))
_VISION = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.",
           "model.multi_modal_projector.")


def is_image_text(model: Model) -> bool:
    """Whether ``model`` is an image-text checkpoint this module can take the text from."""
    return model.arch in IMAGE_TEXT and isinstance(model.config.get("text_config"), dict)


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's full config: ``text_config`` with the defaults its config
    class fills in (Hub configs leave many out) where transformers is installed, the
    tying and special token ids of the outer config where the inner one lacks them."""
    inner = dict(config["text_config"])
    family = str(inner.get("model_type") or {"gemma3": "gemma3_text"}.get(str(config.get("model_type")), "llama"))
    inner["model_type"] = family
    try:
        import transformers
        full = transformers.AutoConfig.for_model(family, **inner).to_dict()
        full = {k: v for k, v in full.items() if not k.startswith("_") and k != "transformers_version"}
        inner = {**full, **{k: v for k, v in inner.items() if not k.startswith("_")}}
    except (ImportError, ValueError, TypeError):
        pass
    for key in ("tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        if inner.get(key) is None and config.get(key) is not None:
            inner[key] = config[key]
    if "tie_word_embeddings" in config:
        inner["tie_word_embeddings"] = bool(config["tie_word_embeddings"])
    inner["architectures"] = [TEXT_CLASSES.get(family, "LlamaForCausalLM")]
    inner.setdefault("dtype", config.get("dtype") or config.get("torch_dtype"))
    return inner


def _text_name(name: str) -> str | None:
    if name.startswith(_VISION):
        return None
    for old, new in _RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return None


def parts(model: Model) -> dict[str, Any] | None:
    """What ``inspect`` shows of an image-text checkpoint: its language model (family,
    parameters, the text config's sizes), vision tower (type, layers, width, image and
    patch size, parameters) and projector (parameters, image tokens); None otherwise."""
    if not is_image_text(model):
        return None
    counts = {"language": 0, "vision": 0, "projector": 0}
    for name, ref in model.tensors.items():
        kind = ("projector" if "multi_modal_projector." in name else "vision" if name.startswith(_VISION)
                else "language")
        counts[kind] += ref.numel
    text = model.config["text_config"]
    vision = model.config.get("vision_config") or {}
    return {
        "language": {"family": str(text.get("model_type") or {"gemma3": "gemma3_text"}.get(model.arch, "llama")),
                     "params": counts["language"],
                     **{k: text[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size") if k in text}},
        "vision": {"params": counts["vision"],
                   **{k: vision[k] for k in ("model_type", "hidden_size", "num_hidden_layers", "image_size",
                                             "patch_size") if k in vision}},
        "projector": {"params": counts["projector"],
                      **{k: model.config[k] for k in ("mm_tokens_per_image", "projector_hidden_act")
                         if k in model.config}},
    }


def text_model(model: Model, writer: str = "") -> Model:
    """``model`` itself, or for an image-text checkpoint its language model (HF text
    names, the text config), with a note on stderr naming what was left out."""
    if not is_image_text(model):
        return model
    tensors = {}
    left = 0
    for name, ref in model.tensors.items():
        new = _text_name(name)
        if new is None:
            left += 1
            continue
        tensors[new] = dataclasses.replace(ref, name=new)
    config = text_config(model.config)
    cls = (model.config.get("architectures") or [model.arch])[0]
    print(f"note: {model.source}: {cls}: converting its {config['model_type']} language model"
          f"{' for ' + writer if writer else ''}; the vision tower and projector ({left} tensors) "
          "are left out", file=sys.stderr)
    return dataclasses.replace(model, arch=config["model_type"], config=config, tensors=tensors)
