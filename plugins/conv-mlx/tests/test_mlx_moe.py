"""Mixtures of experts in MLX (Mixtral, Qwen2-MoE, Qwen3-MoE): each layer's experts
stacked into ``switch_mlp`` as mlx-lm's ``sanitize()`` stacks them, quantized per
expert; checked against transformers in mlx-lm, against mlx_lm.convert byte for byte,
and read back to per-expert HF tensors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

import convcore
from convcore.testing.models import tiny_model
from mlx_helpers import assert_same_tensors, config, mlx_lm_convert, mlx_logits

pytest.importorskip("mlx_lm")
pytestmark = pytest.mark.mlx
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")


def _ids(src, n=96):
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    return [int(t) for t in np.random.default_rng(1).integers(3, vocab, size=n)]


@pytest.mark.parametrize("arch", MOE)
def test_moe_f32_in_mlx_lm_and_back(arch, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM
    src = tiny_model(arch)
    out = convcore.convert(src, tmp_path / "mlx", to="mlx")
    stacked = [n for n in convcore.open_tensors(out / "model.safetensors")[0] if "switch_mlp" in n]
    assert len(stacked) == 3 * 2   # gate/up/down per layer
    ids = _ids(src)
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()(
            torch.tensor([ids])).logits[0].numpy()
    err = float(np.abs(mlx_logits(out, ids) - ref).max() / np.abs(ref).max())
    assert err <= 1e-3, f"{arch}: mlx-lm vs transformers {err:.2e}"
    back = convcore.convert(out, tmp_path / "hf", to="hf")
    a, b = load_file(src / "model.safetensors"), load_file(back / "model.safetensors")
    assert set(a) == set(b)
    for name in a:
        assert np.array_equal(a[name], b[name]), name


@pytest.mark.parametrize("arch", MOE)
def test_moe_int4_equals_mlx_lm_convert(arch, tmp_path, affine_registry):
    src = tiny_model(arch)
    ours = convcore.convert(src, tmp_path / "ours", to="mlx", quant="int4-g64", registry=affine_registry)
    theirs_src = tmp_path / "src"
    shutil.copytree(src, theirs_src)
    cfg = json.loads((theirs_src / "config.json").read_text())
    # mlx_lm.convert cannot even load what transformers 5 saves for Qwen3-MoE (no
    # num_experts, no rope_theta); give it the keys its model class needs
    cfg.setdefault("num_experts", cfg.get("num_local_experts"))
    cfg.setdefault("rope_theta", convcore.hfconfig.rope_parameters(cfg)["rope_theta"])
    (theirs_src / "config.json").write_text(json.dumps(cfg))
    theirs = mlx_lm_convert(theirs_src, tmp_path / "theirs", bits=4, group=64)
    assert_same_tensors(ours, theirs)
    assert config(ours)["quantization"] == config(theirs)["quantization"]
    if arch == "qwen3_moe":   # its model class keeps the router at 8 bits
        assert config(ours)["quantization"]["model.layers.0.mlp.gate"] == {"group_size": 64, "bits": 8}
    ids = _ids(src, 24)
    np.testing.assert_array_equal(mlx_logits(ours, ids), mlx_logits(theirs, ids))
    back = convcore.load(ours)
    w = back.tensors["model.layers.1.mlp.experts.3.down_proj.weight" if arch != "mixtral"
                     else "model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    assert w.stored == "int4-g64" and w.shape == convcore.load(src).tensors[w.name].shape
