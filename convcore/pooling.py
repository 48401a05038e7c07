"""Sentence embeddings from an encoder's hidden states, pooled as the model's
sentence-transformers files say (``modules.json``, ``1_Pooling/config.json``,
a ``Normalize`` module); mean pooling when a model has none.

Runtimes that pool themselves (llama.cpp reads the pooling type from the GGUF) don't use
this; transformers and ONNX Runtime sessions of encoders do.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ENCODER_SUFFIXES = ("Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification",
                    "ForQuestionAnswering", "ForPreTraining", "ForNextSentencePrediction")
DECODER_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def is_encoder(config: dict[str, Any]) -> bool:
    """An encoder-only model: no causal-LM architecture and no decoder flag, with an
    architecture transformers' encoders use (``BertModel``, ``XLMRobertaModel``, ...)."""
    archs = [str(a) for a in config.get("architectures") or []]
    if config.get("is_decoder") or config.get("is_encoder_decoder"):
        return False
    if any(a.endswith(DECODER_SUFFIXES) for a in archs):
        return False
    if archs:
        return any(a.endswith(ENCODER_SUFFIXES) for a in archs)
    return str(config.get("model_type")) in ("bert", "roberta", "xlm-roberta", "distilbert", "electra",
                                             "deberta", "deberta-v2", "mpnet", "nomic_bert", "modernbert")


@dataclass(frozen=True)
class Pooling:
    mode: str = "mean"  # mean | cls | max | lasttoken
    normalize: bool = False
    source: str = "default"  # where the setting came from


def read_pooling(path: Path) -> Pooling:
    """The pooling a sentence-transformers directory declares (mean when none)."""
    path = Path(path)
    try:
        modules = json.loads((path / "modules.json").read_text())
    except (OSError, ValueError):
        return Pooling()
    mode, normalize, source = "mean", False, "modules.json"
    for module in modules if isinstance(modules, list) else []:
        kind = str(module.get("type", ""))
        if kind.endswith("Normalize"):
            normalize = True
        if kind.endswith("Pooling"):
            try:
                cfg = json.loads((path / str(module.get("path", "")) / "config.json").read_text())
            except (OSError, ValueError):
                continue
            source = f"{module.get('path')}/config.json"
            for key, name in (("pooling_mode_cls_token", "cls"), ("pooling_mode_max_tokens", "max"),
                              ("pooling_mode_lasttoken", "lasttoken"), ("pooling_mode_mean_tokens", "mean")):
                if cfg.get(key):
                    mode = name
                    break
    return Pooling(mode, normalize, source)


def pool(hidden: np.ndarray, pooling: Pooling, mask: np.ndarray | None = None) -> np.ndarray:
    """One embedding from ``hidden`` (tokens, dim), float32."""
    h = np.asarray(hidden, dtype=np.float32)
    m = np.ones(h.shape[0], dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if pooling.mode == "cls":
        out = h[0]
    elif pooling.mode == "lasttoken":
        out = h[np.nonzero(m)[0][-1]]
    elif pooling.mode == "max":
        out = h[m].max(axis=0)
    else:
        out = h[m].mean(axis=0, dtype=np.float64).astype(np.float32)
    if pooling.normalize:
        out = out / max(float(np.linalg.norm(out)), 1e-12)
    return out.astype(np.float32)
