"""LongRoPE in the onnx builder (Phi-3 128k)."""
from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

import convcore
from convcore.testing.models import tiny_model

pytestmark = [pytest.mark.onnx]


def test_longrope_switches_tables_as_transformers(tmp_path):
    """Phi-3's LongRoPE in the builder: the short table while the sequence is within the
    original context (64 here), the long one past it, chosen per run in the graph; logits
    against transformers on both sides of the threshold, and through the KV cache."""
    import torch
    from transformers import AutoModelForCausalLM
    from convcore.testing.models import ROPE_VARIANTS
    src = tiny_model("phi3", **ROPE_VARIANTS["longrope"])
    out = convcore.convert(src, tmp_path / "onnx", to="onnx", dtype="f32")
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    ids = [int(t) for t in np.random.default_rng(7).integers(3, vocab, size=120)]
    for n in (40, 120):   # below and past the original 64
        with torch.no_grad():
            ref = model(torch.tensor([ids[:n]])).logits[0].numpy()
        got = convcore.get_registry().infer(out, ids[:n], "onnx")
        assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-4, n
    back = convcore.convert(out, tmp_path / "hf", to="hf")
    a, b = load_file(src / "model.safetensors"), load_file(back / "model.safetensors")
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
