"""MLX -> HF: f32 round trips bit-exact; quantized layers come back as mx.dequantize
computes them; the HF config is restored."""
from __future__ import annotations

import json

import numpy as np
import pytest

import convcore
from mlx_helpers import ARCHS, config, tiny


def hf_tensors(path):
    model = convcore.load(path, "hf")
    return {n: (r.dtype, r.shape, np.ascontiguousarray(r.load()).tobytes()) for n, r in model.tensors.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_mlx_f32_round_trip_is_bit_exact(tmp_path, tiny_model_factory, affine_registry, arch):
    src = tiny(tiny_model_factory, arch)
    mid = convcore.convert(src, tmp_path / "mlx", to="mlx", quant="f32", registry=affine_registry)
    assert convcore.get_registry().detect(mid) == "mlx"
    back = convcore.convert(mid, tmp_path / "hf", to="hf", registry=affine_registry)
    a, b = hf_tensors(src), hf_tensors(back)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], name
    cfg = json.loads((back / "config.json").read_text())
    assert "quantization" not in cfg and "quantization_config" not in cfg
    assert cfg["model_type"] == json.loads((src / "config.json").read_text())["model_type"]


@pytest.mark.mlx
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_mlx_int4_to_hf_gives_mx_dequantize(tmp_path, tiny_model_factory, affine_registry, dtype):
    import mlx.core as mx

    from mlx_helpers import to_mx, to_np

    src = tiny_model_factory("llama")
    mid = convcore.convert(src, tmp_path / "mlx", to="mlx", quant="int4-g64", dtype=dtype,
                           registry=affine_registry)
    back = convcore.convert(mid, tmp_path / "hf", to="hf", registry=affine_registry)
    raw = {}
    for file in mid.glob("*.safetensors"):
        raw.update(convcore.open_tensors(file)[0])
    got = hf_tensors(back)
    quantized = [n[: -len(".scales")] for n in raw if n.endswith(".scales")]
    assert "model.embed_tokens" in quantized and "lm_head" in quantized
    for stem in quantized:
        want = mx.dequantize(to_mx(raw[f"{stem}.weight"].load()), to_mx(raw[f"{stem}.scales"].load()),
                             to_mx(raw[f"{stem}.biases"].load()), 64, 4)
        want = np.ascontiguousarray(to_np(want))
        assert got[f"{stem}.weight"] == (dtype, want.shape, want.tobytes()), stem
    for name, ref in raw.items():  # norms pass through untouched
        if name.endswith("norm.weight"):
            assert got[name][2] == np.ascontiguousarray(ref.load()).tobytes()
    assert "quantization" not in config(back)


@pytest.mark.mlx
def test_mlx_dir_written_by_mlx_lm_reads_back(tmp_path, tiny_model_factory, affine_registry):
    from mlx_helpers import mlx_lm_convert

    theirs = mlx_lm_convert(tiny_model_factory("qwen2"), tmp_path / "theirs", bits=8, group=32)
    assert affine_registry.validate(theirs) == []
    with convcore.using(affine_registry):
        model = convcore.load(theirs)
    assert model.format == "mlx" and model.arch == "qwen2"
    emb = model.tensors["model.embed_tokens.weight"]
    assert emb.shape == (1024, 256) and emb.dtype == "f32"
    src = convcore.load(tiny_model_factory("qwen2"), "hf").tensors["model.embed_tokens.weight"].load()
    err = np.abs(emb.load() - src).max()
    assert 0 < err < np.abs(src).max() / 100  # 8-bit groups: within 1% of the range
