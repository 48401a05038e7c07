"""Shared helpers of the conv-onnx tests: tiny models per arch (with the settings real
checkpoints carry), transformers references and an onnxruntime run with the KV cache."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from convcore.testing.models import tiny_model

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
# real checkpoints' settings tiny defaults forget: mistral v0.1's sliding window, gemma3's
# 5:1 local/global layers with their own rope base (here 1:1 so both kinds are present)
OVERRIDES: dict[str, dict[str, Any]] = {
    "mistral": {"sliding_window": 48},
    "gemma3_text": {"layer_types": ["sliding_attention", "full_attention"]},
    "llama": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 64}},
}
PROMPT_LEN = 80  # longer than the tiny models' sliding windows (48, 64)


def source(arch: str, **extra: Any) -> Path:
    # weights 5x the default spread, so greedy generation wanders instead of repeating
    return tiny_model(arch, init_std=0.1, **OVERRIDES.get(arch, {}), **extra)


def prompt(vocab: int, n: int = PROMPT_LEN, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, vocab, size=n)]


def hf_model(path: Path) -> Any:
    import torch
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def hf_logits(model: Any, ids: list[int]) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model: Any, ids: list[int], n: int) -> list[int]:
    import torch
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1)
    return [int(t) for t in out[0, len(ids):]]


def genai_greedy(path: Path, ids: list[int], n: int) -> list[int]:
    import onnxruntime_genai as og
    model = og.Model(str(path))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)][len(ids):]
