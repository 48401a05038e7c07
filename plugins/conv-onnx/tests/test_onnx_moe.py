"""Mixtures of experts to ONNX (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE):
the export path gives transformers' experts a forward without data-dependent shapes
(every expert on every token, weighted by the router), so torch.onnx.export takes it;
logits in onnxruntime against transformers, and back to per-expert HF tensors."""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

import convcore
from convcore.testing.models import tiny_model

pytestmark = [pytest.mark.onnx]
N_TOKENS = 96


def transformers_logits(model_dir, seed):
    """(token ids, the transformers model of ``model_dir``, its logits on them)."""
    import torch
    from transformers import AutoModelForCausalLM
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    ids = [int(t) for t in np.random.default_rng(seed).integers(3, vocab, size=N_TOKENS)]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return ids, model, model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("arch", [pytest.param("mixtral", marks=pytest.mark.full), "qwen2_moe",
                                  pytest.param("qwen3_moe", marks=pytest.mark.full)])
def test_moe_export_logits_and_read_back(arch, tmp_path):
    import torch
    src = tiny_model(arch)
    out = convcore.convert(src, tmp_path / "onnx", to="onnx", dtype="f32")
    ids, model, ref = transformers_logits(src, 5)
    with convcore.get_registry().open_session(out) as s:
        got = s.logits(ids)
        step = s.decode([7])
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-4
    with torch.no_grad():
        ref_step = model(torch.tensor([ids + [7]])).logits[0, -1].numpy()
    assert np.abs(step[0] - ref_step).max() / np.abs(ref_step).max() <= 1e-4   # the KV cache
    back = convcore.convert(out, tmp_path / "hf", to="hf")
    a, b = load_file(src / "model.safetensors"), load_file(back / "model.safetensors")
    assert set(b) == set(a)
    for name in a:
        assert np.array_equal(a[name], b[name]), name



# make test keeps the MoE export's logits and read-back; quantized MoE export in test-full
@pytest.mark.parametrize("arch,scheme", [pytest.param("qwen2_moe", "int4-b32", marks=pytest.mark.full),
                                         pytest.param("mixtral", "int8-b32-asym", marks=pytest.mark.full)])
def test_moe_export_quantized(arch, scheme, tmp_path):
    """--quant on the export path: every expert, attention and shared-expert matrix (and
    the lm_head) in MatMulNBits, routers float; onnxruntime computes what transformers
    computes on the dequantized weights the reader gives back; the file holds each weight
    once (no float copy beside the codes)."""
    import onnx
    src = tiny_model(arch)
    out = convcore.convert(src, tmp_path / "onnx", to="onnx", quant=scheme,
                           options={"path": "export", "accuracy_level": 1})
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    config = json.loads((src / "config.json").read_text())
    layers, experts = config["num_hidden_layers"], config.get("num_local_experts") or config["num_experts"]
    shared = 3 if "shared_expert_intermediate_size" in config else 0
    assert len(nbits) == layers * (4 + 3 * experts + shared) + 1
    assert not [n for n in graph.node if n.op_type == "MatMul" and n.output[0] == "logits"]
    back = convcore.load(out)
    routers = [n for n in back.tensors if n.endswith(".gate.weight")]
    assert len(routers) == layers and all(back.tensors[n].stored == "" for n in routers)
    stored = {back.tensors[n].stored for n in back.tensors if ".experts." in n}
    assert stored == {scheme}
    data = (out / "model.onnx.data").stat().st_size
    assert data < 0.5 * (src / "model.safetensors").stat().st_size   # codes only, no f32 copies

    hf = convcore.convert(out, tmp_path / "hf", to="hf")
    ids, _, ref = transformers_logits(hf, 6)
    with convcore.get_registry().open_session(out) as s:
        got = s.logits(ids)
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-4
    a = load_file(src / "model.safetensors")
    for name in routers:
        assert np.array_equal(back.tensors[name].load(), a[name]), name
