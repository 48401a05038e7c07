"""The dense families users convert beside Llama (OLMo-2, Granite-3, SmolLM3, StarCoder2,
Phi-2), each with its published settings (OLMo-2's whole-projection q/k norms and post-
norms, Granite's multipliers, SmolLM3's rope-less 4th layers, StarCoder2's biases and
LayerNorm, Phi-2's partial rotary), in every format: llama.cpp, mlx-lm and onnxruntime
logits against transformers, the GGUF read back bit-exact, q4_k_m loading."""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

import convcore
from convcore.testing.models import tiny_model

FAMILIES = ["olmo2", "granite", "smollm3", "starcoder2", "phi"]
KW = {"smollm3": {"layers": 4}}   # so a rope-less layer is among them
TOLERANCE = {"gguf": 1e-3, "mlx": 1e-3, "onnx": 1e-4}


@pytest.mark.llamacpp
@pytest.mark.mlx
@pytest.mark.onnx
@pytest.mark.parametrize("family", [f if f in ("olmo2", "phi") else pytest.param(f, marks=pytest.mark.full)
                                    for f in FAMILIES])
def test_family_in_every_format(family, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM
    src = tiny_model(family, **KW.get(family, {}))
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    ids = [int(t) for t in np.random.default_rng(1).integers(3, vocab, size=80)]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()(
            torch.tensor([ids])).logits[0].numpy()
    registry = convcore.get_registry()
    outputs = {}
    for fmt in ("gguf", "mlx", "onnx"):
        outputs[fmt] = convcore.convert(src, tmp_path / f"out.{fmt}", to=fmt,
                                        dtype="f32" if fmt == "onnx" else None)
        err = float(np.abs(registry.infer(outputs[fmt], ids, fmt) - ref).max() / np.abs(ref).max())
        assert err <= TOLERANCE[fmt], f"{family} -> {fmt}: {err:.2e}"
    back = convcore.convert(outputs["gguf"], tmp_path / "hf", to="hf")
    a, b = load_file(src / "model.safetensors"), load_file(back / "model.safetensors")
    assert set(a) == set(b)
    assert all(np.array_equal(a[n], b[n]) for n in a)
    q = convcore.convert(src, tmp_path / "q.gguf", to="gguf", quant="q4_k_m")
    got = registry.infer(q, ids, "gguf")
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.5


def test_smollm3_layout_llamacpp_cannot_run_is_refused(tmp_path):
    import shutil
    src = tmp_path / "src"
    shutil.copytree(tiny_model("smollm3", layers=4), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["no_rope_layers"] = [1, 0, 1, 1]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(convcore.ConvcoreError, match="every 4th layer"):
        convcore.convert(src, tmp_path / "x.gguf", to="gguf")


@pytest.mark.onnx
@pytest.mark.parametrize("family,scheme", [
    ("starcoder2", "int4-b32"),
    *[pytest.param(f, "int8-b32-asym", marks=pytest.mark.full) for f in ("olmo2", "granite", "smollm3", "phi")],
])
def test_onnx_export_path_quantized(family, scheme, tmp_path):
    """The export path's int4/int8: MatMulNBits on every projection (biases stay Adds),
    onnxruntime equal to transformers on the weights the reader dequantizes back."""
    import onnx
    import torch
    from transformers import AutoModelForCausalLM
    src = tiny_model(family, **KW.get(family, {}))
    out = convcore.convert(src, tmp_path / "q", to="onnx", quant=scheme, options={"accuracy_level": 1})
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert not [n for n in graph.node if n.op_type == "MatMul" and
                any(i.endswith(".weight.T") for i in n.input)]
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) >= 6 * json.loads(
        (src / "config.json").read_text())["num_hidden_layers"]
    hf = convcore.convert(out, tmp_path / "hf", to="hf")
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    ids = [int(t) for t in np.random.default_rng(2).integers(3, vocab, size=80)]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()(
            torch.tensor([ids])).logits[0].numpy()
    got = convcore.get_registry().infer(out, ids, "onnx")
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-4
