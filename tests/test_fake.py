"""convcore fake: a real architecture's exact tensors with generated values, streamed."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import convcore
from convcore.testing.models import LLAMA_70B_CONFIG, tiny_model


def tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    model = convcore.load(path)
    return {n: (t.dtype, tuple(t.shape)) for n, t in model.tensors.items()}


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_fake_has_the_sources_tensors_and_runs_in_transformers(arch: str, tmp_path: Path) -> None:
    src = tiny_model(arch, layers=6) if arch == "gemma3_text" else tiny_model(arch)
    out = tmp_path / "fake"
    # the command itself runs in tests/test_hub.py (fake of a hub id) and below (bad sources)
    convcore.convert(src, out, "hf", from_="fake", load_options={"init": "random"})
    assert tensors(out) == tensors(src)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("tokenizer")) == \
        sorted(p.name for p in src.iterdir() if p.name.startswith("tokenizer"))
    # the hf runtime refuses a checkpoint missing any weight: this one runs as it is
    with convcore.get_registry().open_session(out, "hf") as s:
        assert np.isfinite(s.logits([1, 2, 3])).all()
    weight = convcore.load(out).tensors["model.layers.0.mlp.up_proj.weight"].load()
    assert 0.015 < float(np.std(weight)) < 0.025   # N(0, initializer_range)


def test_fake_is_deterministic_and_keeps_the_first_layers(tmp_path: Path) -> None:
    src = tiny_model("gemma3_text", layers=6)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 1), (b, 1), (c, 2)):
        convcore.convert(src, out, "hf", from_="fake", dtype="bf16",
                         load_options={"seed": seed, "layers": 2, "init": "random"})
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    config = json.loads((a / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and len(config["layer_types"]) == 2
    assert {d for d, _ in tensors(a).values()} == {"bf16"}
    assert not any(".layers.2." in n for n in tensors(a))


def test_fake_from_a_config_alone_and_straight_to_gguf(tmp_path: Path) -> None:
    src = tiny_model("llama")
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    out = tmp_path / "fake"
    convcore.convert(tmp_path / "config.json", out, "hf", from_="fake")
    assert tensors(out) == tensors(src) and not (out / "tokenizer.json").exists()
    # run --from fake converts without an HF folder in between; llama.cpp runs the result
    gguf = tmp_path / "fake.gguf"
    convcore.convert(src, gguf, "gguf", from_="fake", quant="q8_0")
    with convcore.get_registry().open_session(gguf, "gguf", {"n_ctx": 64}) as s:
        assert np.isfinite(s.logits([1, 2, 3])).all()


def test_bad_fake_sources_are_one_line(tmp_path: Path, run_cli) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    r = run_cli("fake", tmp_path / "config.json", "-o", tmp_path / "out")
    assert r.returncode == 1 and "cannot tell the architecture" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    r = run_cli("fake", tiny_model("llama"), "-o", tmp_path / "out", "--layers", "9")
    assert r.returncode == 1 and "the config has 2 layers" in r.stderr


@pytest.mark.full
def test_a_70b_config_with_two_layers_loads_in_transformers(tmp_path: Path, run_cli) -> None:
    import torch
    import transformers

    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B_CONFIG))
    out = tmp_path / "fake"
    r = run_cli("fake", tmp_path / "config.json", "-o", out, "--layers", "2", "-q")
    assert r.returncode == 0, r.stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 8192
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits.float()).all()
    shutil.rmtree(out)
