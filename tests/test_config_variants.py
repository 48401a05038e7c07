"""Configs as published leave per-layer attention and rope implicit; every writer must
derive them as transformers does (Gemma-3 with ``layer_types``, with only the older
``sliding_window_pattern`` and v4 rope keys, with neither; Gemma-2 without ``layer_types``),
and a GGUF read back to HF must say them explicitly, so the chain GGUF -> HF -> ONNX / MLX
computes what transformers computes on the HF folder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import convcore
from convcore.testing.models import tiny_model

N_TOKENS = 80   # past the sliding window of 16, so local and global layers differ
WINDOW = 16


def _variant(tmp: Path, name: str) -> Path:
    """A copy of a tiny Gemma model whose config.json is written as checkpoints have it."""
    arch = "gemma2" if name == "gemma2-implicit" else "gemma3_text"
    src = tiny_model(arch, layers=6, sliding_window=WINDOW, init_std=0.1)
    dst = tmp / name
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    if name in ("gemma3-pattern", "gemma3-implicit", "gemma2-implicit"):
        cfg.pop("layer_types")
    if name == "gemma3-pattern":
        # as Gemma-3 checkpoints from before layer_types say it (v4 rope keys)
        cfg["sliding_window_pattern"] = 3
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope["full_attention"]["rope_theta"]
        cfg["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def _reference(src: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _ids(src: Path) -> list[int]:
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    return [int(t) for t in np.random.default_rng(3).integers(3, vocab, size=N_TOKENS)]


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


VARIANTS = ["gemma3-explicit", "gemma3-pattern", "gemma3-implicit", "gemma2-implicit"]


@pytest.mark.onnx
@pytest.mark.parametrize("name", VARIANTS)
def test_onnx_builder_derives_layers_as_transformers(name, tmp_path):
    src = _variant(tmp_path, name)
    ids = _ids(src)
    out = convcore.convert(src, tmp_path / "onnx", to="onnx", dtype="f32")
    err = _rel(convcore.get_registry().infer(out, ids, "onnx"), _reference(src, ids))
    assert err <= 1e-4, f"{name}: onnxruntime vs transformers: {err:.2e}"


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", VARIANTS)
def test_gguf_derives_layers_as_transformers(name, tmp_path):
    src = _variant(tmp_path, name)
    ids = _ids(src)
    out = convcore.convert(src, tmp_path / "m.gguf", to="gguf")
    err = _rel(convcore.get_registry().infer(out, ids, "gguf"), _reference(src, ids))
    assert err <= 1e-3, f"{name}: llama.cpp vs transformers: {err:.2e}"


@pytest.mark.mlx
@pytest.mark.parametrize("name", ["gemma3-explicit", "gemma3-pattern", "gemma3-implicit"])
def test_mlx_derives_layers_as_transformers(name, tmp_path):
    src = _variant(tmp_path, name)
    ids = _ids(src)
    out = convcore.convert(src, tmp_path / "mlx", to="mlx")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["sliding_window_pattern"] == (3 if name == "gemma3-pattern" else 6)
    assert (cfg["rope_theta"], cfg["rope_local_base_freq"]) == (1e6, 1e4)
    err = _rel(convcore.get_registry().infer(out, ids, "mlx"), _reference(src, ids))
    assert err <= 1e-3, f"{name}: mlx-lm vs transformers: {err:.2e}"


@pytest.mark.onnx
@pytest.mark.llamacpp
def test_gguf_to_hf_to_onnx_chain(tmp_path):
    """A Gemma-3 GGUF (llama.cpp's fixed 5:1 layout) read back to HF says its layer types
    and both rope bases in the config, and the onnx builder on that folder agrees with
    transformers on it."""
    src = _variant(tmp_path, "gemma3-implicit")
    gguf_file = convcore.convert(src, tmp_path / "m.gguf", to="gguf")
    hf = convcore.convert(gguf_file, tmp_path / "hf", to="hf")
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert cfg["rope_parameters"]["full_attention"]["rope_theta"] == 1e6
    assert cfg["rope_parameters"]["sliding_attention"]["rope_theta"] == 1e4
    ids = _ids(hf)
    ref = _reference(hf, ids)
    out = convcore.convert(hf, tmp_path / "onnx", to="onnx", dtype="f32")
    err = _rel(convcore.get_registry().infer(out, ids, "onnx"), ref)
    assert err <= 1e-4, f"gguf -> hf -> onnx vs transformers on the hf folder: {err:.2e}"
    # and what llama.cpp computes from the GGUF is what transformers computes from its
    # read-back HF folder
    assert _rel(convcore.get_registry().infer(gguf_file, ids, "gguf"), ref) <= 1e-3
