"""int4 / int8 MatMulNBits: byte-identical to onnxruntime-genai's model builder with the
same settings, logits error no worse than its, read back as the scheme dequantizes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import convcore
from onnx_helpers import hf_logits, hf_model, prompt, source

pytestmark = [pytest.mark.onnx]


def peer_build(src: Path, out: Path, precision: str, block: int, symmetric: bool) -> Path:
    """onnxruntime-genai's builder with the same settings (it loads the torch model)."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(out.parent / "peer-cache"),
           "--extra_options", f"block_size={block}", f"is_symmetric={str(symmetric).lower()}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def initializers(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    return {t.name: numpy_helper.to_array(t, str(path)) for t in model.graph.initializer}


def session_logits(path: Path, ids: list[int]) -> np.ndarray:
    with convcore.get_registry().open_session(path) as s:
        return s.logits(ids)


SETTINGS = [("llama", 4, 32, True), ("llama", 4, 128, False), ("llama", 8, 32, True),
            ("llama", 8, 64, False), ("qwen2", 4, 32, True), ("gemma2", 4, 32, True)]
# the default tier's sample: int4 symmetric (the peer's default) and int8 with zero points
SAMPLE = {("llama", 4, 32, True), ("llama", 8, 64, False)}
SETTINGS = [s if s in SAMPLE else pytest.param(*s, marks=pytest.mark.full) for s in SETTINGS]


@pytest.mark.slow
@pytest.mark.parametrize("arch,bits,block,symmetric", SETTINGS)
def test_matmulnbits_bytes_equal_peer(arch: str, bits: int, block: int, symmetric: bool,
                                      tmp_path: Path) -> None:
    src = source(arch)
    scheme = f"int{bits}-b{block}" + ("" if symmetric else "-asym")
    ours = tmp_path / "ours"
    convcore.convert(src, ours, to="onnx", quant=scheme)
    peer = peer_build(src, tmp_path / "peer", f"int{bits}", block, symmetric)
    mine, theirs = initializers(ours), initializers(peer)
    packed = [n for n in mine if f"_Q{bits}" in n or n.endswith(("_scales", "_zero_points"))]
    # every linear layer and lm_head: (q, scales[, zero points]) per layer
    layers = convcore.load(src).config["num_hidden_layers"]
    assert len(packed) == (5 * layers + 1) * (2 if symmetric else 3)
    for name in packed:
        assert name in theirs, name
        assert mine[name].dtype == theirs[name].dtype and mine[name].shape == theirs[name].shape, name
        assert mine[name].tobytes() == theirs[name].tobytes(), name
    if arch == "gemma2":
        return  # the peer's sliding-window graph wants a preallocated cache (genai's), not ours
    # the same weights in both graphs: their logits errors agree
    ref_model = hf_model(src)
    ids = prompt(ref_model.config.vocab_size, 40)
    ref = hf_logits(ref_model, ids)
    ours_err = np.abs(session_logits(ours, ids) - ref).max()
    peer_err = np.abs(session_logits(peer, ids) - ref).max()
    assert ours_err <= 1.05 * peer_err + 1e-6, (ours_err, peer_err)
    assert 0 < ours_err < np.abs(ref).max()


@pytest.mark.parametrize("block", [None, 1])
def test_int4_read_back_dequantizes(tmp_path: Path, monkeypatch, block: int | None) -> None:
    """MatMulNBits weights read back as the scheme dequantizes them, whole (load) and as
    the chunks the hf writer streams; ``block`` 1: one row per block."""

    if block:
        monkeypatch.setattr(convcore.rowblocks, "BLOCK_ELEMENTS", block)
    src = source("qwen3")
    out = tmp_path / "q"
    convcore.convert(src, out, to="onnx", quant="int4-b64-asym")
    back, orig = convcore.load(out), convcore.load(src)
    scheme = convcore.get_registry().schemes["int4-b64-asym"]
    assert set(back.tensors) == set(orig.tensors)
    for name in ("model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.down_proj.weight", "lm_head.weight"):
        ref = orig.tensors[name].load()
        got = back.tensors[name].load()
        assert back.tensors[name].stored == "int4-b64-asym"
        want = scheme.dequantize(convcore.quantize(ref, "int4-b64-asym").data, ref.shape)
        assert np.array_equal(got, want), name
        pieces = list(back.tensors[name].load_chunks("f16"))
        assert len(pieces) == (ref.shape[0] if block else 1), name
        assert np.concatenate(pieces).tobytes() == convcore.cast(want, "f16").reshape(-1).tobytes(), name
    # norms stay exact
    name = "model.layers.0.self_attn.q_norm.weight"
    assert np.array_equal(back.tensors[name].load(), orig.tensors[name].load())


def test_quantize_lm_head_off_and_accuracy_level(tmp_path: Path) -> None:
    out = tmp_path / "q"
    convcore.convert(source("llama"), out, to="onnx", quant="int8-b32",
                     options={"quantize_lm_head": False, "accuracy_level": 1})
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 10 and all(
        onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "accuracy_level")) == 1
        for n in nbits)
    assert any(n.op_type == "MatMul" and n.output[0] == "logits" for n in model.graph.node)
    assert convcore.load(out).tensors["lm_head.weight"].stored == ""


def test_unknown_scheme_is_one_line(tmp_path: Path, run_cli) -> None:
    res = run_cli("run", str(source("llama")), "--to", "onnx", "-o", str(tmp_path / "o"), "--quant", "q4_k_m")
    assert res.returncode != 0 and res.stderr.startswith("error: ") and len(res.stderr.splitlines()) == 1
