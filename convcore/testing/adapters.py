"""Tiny LoRA adapters made by PEFT itself over the test kit's tiny models.

The B matrices are random (PEFT initialises them to zero, which would hide a converter
that drops them) and scaled down so the adapted model stays a sane model.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

#: q/k/v/o and the MLP: what a full fine-tune's LoRA usually targets
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_tiny_lora(path: str | os.PathLike, base: str | os.PathLike, *, rank: int = 8, alpha: float = 16,
                   targets: tuple[str, ...] = ALL_LINEAR, seed: int = 0, b_scale: float = 0.02,
                   **lora_config: Any) -> Path:
    """A PEFT LoRA folder at ``path`` over the HF model at ``base`` (its config names
    ``base`` as ``base_model_name_or_path``). ``lora_config`` goes to ``peft.LoraConfig``
    (``use_rslora``, ``rank_pattern``, ``alpha_pattern``, ``modules_to_save``, ...)."""
    import peft
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                             init_lora_weights=False, lora_dropout=0.0, **lora_config)
    model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.mul_(b_scale / max(float(p.abs().max()), 1e-12))
    model.save_pretrained(str(path))
    return Path(path)


def tiny_lora(base: str | os.PathLike, **kwargs: Any) -> Path:
    """A cached :func:`make_tiny_lora` (built once per base and argument set)."""
    from .models import _cached

    key = json.dumps({"base": str(base), "v": 1, **kwargs}, sort_keys=True, default=str)
    name = f"lora-{hashlib.sha256(key.encode()).hexdigest()[:16]}"

    return _cached(name, lambda tmp: make_tiny_lora(tmp, base, **kwargs), marker="adapter_config.json")


def peft_logits(base: str | os.PathLike, adapter: str | os.PathLike, ids: list[int]) -> Any:
    """float64 logits of transformers + PEFT (the adapter applied, not merged) on ``ids``."""
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()
