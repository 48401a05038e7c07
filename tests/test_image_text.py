"""Image-text checkpoints (Gemma-3 4B+, Mistral-3, LLaVA: ``*ForConditionalGeneration``)
convert their language model to every runtime format, with a note that the vision tower
and projector were left out; text-only logits in llama.cpp, mlx-lm and onnxruntime match
transformers' image-text model. The hf format keeps the whole checkpoint."""
from __future__ import annotations

import json

import numpy as np
import pytest

import convcore
from convcore.testing.models import tiny_image_text

FAMILIES = ["gemma3", "mistral3", "llava"]
# mlx-lm's gemma3 indexes layer sliding_window_pattern - 1 (6), so its model needs 6 layers
KW = {"gemma3": {"layers": 6}}
TOLERANCE = {"gguf": 1e-3, "mlx": 1e-3, "onnx": 1e-4}


@pytest.fixture(scope="module")
def references():
    cache: dict = {}

    def get(family: str):
        if family not in cache:
            import torch
            import transformers
            src = tiny_image_text(family, **KW.get(family, {}))
            cfg = json.loads((src / "config.json").read_text())
            vocab = cfg["text_config"]["vocab_size"]
            ids = [int(t) for t in np.random.default_rng(1).integers(3, vocab - 10, size=80)]
            model = getattr(transformers, cfg["architectures"][0]).from_pretrained(
                str(src), dtype=torch.float32).eval()
            with torch.no_grad():
                cache[family] = (src, ids, model(input_ids=torch.tensor([ids])).logits[0].numpy())
        return cache[family]
    return get


@pytest.mark.parametrize("fmt", ["gguf", "mlx", "onnx"])
@pytest.mark.parametrize("family", FAMILIES)
def test_language_model_converts_and_computes(family, fmt, references, tmp_path, capfd):
    src, ids, ref = references(family)
    out = convcore.convert(src, tmp_path / f"out.{fmt}", to=fmt, dtype="f32" if fmt == "onnx" else None)
    note = capfd.readouterr().err
    assert "language model" in note and "vision tower and projector" in note and "left out" in note
    got = convcore.get_registry().infer(out, ids, fmt)
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    assert err <= TOLERANCE[fmt], f"{family} -> {fmt}: {err:.2e}"
    text_type = {"gemma3": "gemma3_text", "mistral3": "mistral", "llava": "llama"}[family]
    assert convcore.load(out).arch == ("llama" if text_type == "mistral" and fmt == "gguf" else text_type)


def test_hf_output_keeps_the_vision_part(references, tmp_path):
    src, _, _ = references("llava")
    out = convcore.convert(src, tmp_path / "hf", to="hf", dtype="f16")
    names = set(convcore.load(out).tensors)
    assert any(n.startswith("vision_tower.") for n in names)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlavaForConditionalGeneration"]


@pytest.mark.parametrize("family", ["gemma3", pytest.param("mistral3", marks=pytest.mark.full),
                                    pytest.param("llava", marks=pytest.mark.full)])
def test_inspect_shows_the_language_model_vision_tower_and_projector(family, references, run_cli):
    src, _, _ = references(family)
    res = run_cli("inspect", src, "--json", check=True)
    parts = json.loads(res.stdout)["image_text"]
    import torch
    import transformers
    cfg = json.loads((src / "config.json").read_text())
    model = getattr(transformers, cfg["architectures"][0]).from_pretrained(str(src), dtype=torch.float32)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert parts["vision"]["params"] == count(model.model.vision_tower)
    assert parts["projector"]["params"] == count(model.model.multi_modal_projector)
    # parameters() counts a tied lm_head once, as the checkpoint stores it
    assert parts["language"]["params"] == count(model) - count(model.model.vision_tower) - count(
        model.model.multi_modal_projector)
    assert parts["language"]["family"] == {"gemma3": "gemma3_text", "mistral3": "mistral", "llava": "llama"}[family]
    assert (parts["vision"]["image_size"], parts["vision"]["patch_size"]) == (
        cfg["vision_config"]["image_size"], cfg["vision_config"]["patch_size"])
    text = run_cli("inspect", src, check=True).stdout
    assert f"vision tower: {cfg['vision_config']['model_type']}" in text and "projector:" in text
