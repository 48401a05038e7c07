"""Our HF -> MLX output against mlx_lm.convert's for the same settings: same tensors,
same bytes, same quantization blocks, and the same logits in mlx-lm."""
from __future__ import annotations

import json

import numpy as np
import pytest

import convcore
from mlx_helpers import ARCHS, assert_same_tensors, config, mlx_lm_convert, mlx_logits, tiny

pytest.importorskip("mlx_lm")
pytestmark = pytest.mark.mlx

# setting -> (our convert() kwargs, mlx_lm.convert kwargs)
SETTINGS = {
    "f16": (dict(quant="f16"), dict(dtype="float16")),
    "int4-g64": (dict(quant="int4-g64"), dict(bits=4, group=64)),
    "int8-g32-f16": (dict(quant="int8-g32", dtype="f16"), dict(bits=8, group=32, dtype="float16")),
    "int3-g64": (dict(quant="int3-g64"), dict(bits=3, group=64)),
}
EXTRA = {  # bf16 scales and the other group sizes, on one architecture
    "int2-g128-bf16": (dict(quant="int2-g128", dtype="bf16"), dict(bits=2, group=128, dtype="bfloat16")),
    "int5-g32": (dict(quant="int5-g32"), dict(bits=5, group=32)),
    "int6-g128-f16": (dict(quant="int6-g128", dtype="f16"), dict(bits=6, group=128, dtype="float16")),
}
CASES = [(a, s) for a in ARCHS for s in SETTINGS] + [("qwen2", s) for s in EXTRA]


@pytest.fixture(scope="session")
def pair(tmp_path_factory, tiny_model_factory, affine_registry):
    """(arch, setting) -> (our dir, mlx-lm's dir), converted once per session."""
    cache = {}

    def get(arch: str, setting: str):
        if (arch, setting) not in cache:
            ours_kw, theirs_kw = {**SETTINGS, **EXTRA}[setting]
            src = tiny(tiny_model_factory, arch)
            root = tmp_path_factory.mktemp(f"{arch}-{setting}")
            ours = convcore.convert(src, root / "ours", to="mlx", registry=affine_registry, **ours_kw)
            theirs = mlx_lm_convert(src, root / "theirs", **theirs_kw)
            cache[arch, setting] = (ours, theirs)
        return cache[arch, setting]

    return get


@pytest.mark.parametrize("arch,setting", CASES)
def test_mlx_same_tensors_as_mlx_lm(pair, arch, setting):
    ours, theirs = pair(arch, setting)
    assert_same_tensors(ours, theirs)
    a, b = config(ours), config(theirs)
    assert a.get("quantization") == b.get("quantization")
    assert a.get("quantization_config") == b.get("quantization_config")
    skip = {"dtype", "torch_dtype"}  # we record the cast; mlx-lm leaves them stale
    assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}
    index = [json.loads((d / "model.safetensors.index.json").read_text()) for d in (ours, theirs)]
    assert index[0] == index[1]  # total_size, total_parameters, sorted weight_map


@pytest.mark.parametrize("arch,setting", CASES)
def test_mlx_logits_equal_mlx_lm(pair, arch, setting):
    ours, theirs = pair(arch, setting)
    a, b = mlx_logits(ours), mlx_logits(theirs)
    assert a.shape == (8, 1024) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)


def test_mlx_infer_hook_matches_mlx_lm(pair, affine_registry):
    ours, _ = pair("llama", "int4-g64")
    logits = affine_registry.infer(ours, [1, 17, 230, 5, 99, 512, 3, 42])
    np.testing.assert_array_equal(logits, mlx_logits(ours))


def test_mlx_mixed_recipe_matches_mlx_lm(tmp_path, tiny_model_factory, affine_registry):
    src = tiny_model_factory("llama")
    ours = convcore.convert(src, tmp_path / "ours", to="mlx", quant="int4-g64",
                            options={"quant_recipe": "mixed_3_6"}, registry=affine_registry)
    theirs = mlx_lm_convert(src, tmp_path / "theirs", bits=4, group=64, predicate="mixed_3_6")
    assert_same_tensors(ours, theirs)
    assert config(ours)["quantization"] == config(theirs)["quantization"]
    assert config(ours)["quantization"]["model.layers.1.mlp.down_proj"]["bits"] == 6


def test_mlx_embed_and_lm_head_bits_match_mlx_lm_predicate(tmp_path, tiny_model_factory, affine_registry):
    src = tiny_model_factory("qwen3")
    ours = convcore.convert(src, tmp_path / "ours", to="mlx", quant="int3-g64",
                            options={"embed_bits": "8", "quant_overrides": "lm_head:int6-g32"},
                            registry=affine_registry)

    def predicate(path, module):
        if path.endswith("embed_tokens"):
            return {"group_size": 64, "bits": 8, "mode": "affine"}
        if path == "lm_head":
            return {"group_size": 32, "bits": 6, "mode": "affine"}
        return True

    theirs = mlx_lm_convert(src, tmp_path / "theirs", bits=3, group=64, predicate=predicate)
    assert_same_tensors(ours, theirs)
    q = config(ours)["quantization"]
    assert q == config(theirs)["quantization"]
    assert q["model.embed_tokens"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    np.testing.assert_array_equal(mlx_logits(ours), mlx_logits(theirs))


@pytest.mark.parametrize("quant", [None, "int4-g64"])
def test_mlx_torch_dtype_cast_like_mlx_lm(tmp_path, tiny_model_factory, affine_registry, quant):
    """mlx-lm casts to config.json's torch_dtype when no --dtype is given; so do we."""
    import json
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_model_factory("llama"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["torch_dtype"] = "bfloat16"
    (src / "config.json").write_text(json.dumps(cfg))
    ours = convcore.convert(src, tmp_path / "ours", to="mlx", quant=quant, registry=affine_registry)
    theirs = mlx_lm_convert(src, tmp_path / "theirs", bits=4 if quant else None, group=64 if quant else None)
    assert_same_tensors(ours, theirs)
    assert convcore.open_tensors(ours / "model.safetensors")[0]["model.norm.weight"].dtype == "bf16"


def test_mlx_bf16_source_int4_matches_mlx_lm(tmp_path, tiny_model_factory, affine_registry):
    src = tiny_model_factory("llama", dtype="bf16")
    ours = convcore.convert(src, tmp_path / "ours", to="mlx", quant="int4-g64", registry=affine_registry)
    theirs = mlx_lm_convert(src, tmp_path / "theirs", bits=4, group=64)
    assert_same_tensors(ours, theirs)
    np.testing.assert_array_equal(mlx_logits(ours), mlx_logits(theirs))


def test_mlx_progress_once_per_source_tensor(tmp_path, tiny_model_factory, affine_registry):
    from conv_mlx import write_mlx

    with convcore.using(affine_registry):
        model = convcore.load(tiny_model_factory("qwen2", tie=True), "hf")
        seen = []
        write_mlx(model, tmp_path / "out", {"quant": "int4-g64", "jobs": 2}, seen.append)
    assert sorted(seen) == sorted(model.tensors)
    assert "lm_head.weight" not in convcore.load(tmp_path / "out", "mlx").tensors


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_mlx_tied_embeddings_match_mlx_lm(tmp_path, tiny_model_factory, affine_registry, arch):
    src = tiny_model_factory(arch, tie=True)
    ours = convcore.convert(src, tmp_path / "ours", to="mlx", quant="int4-g32", registry=affine_registry)
    theirs = mlx_lm_convert(src, tmp_path / "theirs", bits=4, group=32)
    assert_same_tensors(ours, theirs)
    assert "lm_head.weight" not in convcore.open_tensors(ours / "model.safetensors")[0]
    np.testing.assert_array_equal(mlx_logits(ours), mlx_logits(theirs))


def test_mlx_sharded_output_loads_in_mlx_lm(pair, tmp_path, tiny_model_factory, affine_registry):
    _, theirs = pair("qwen3", "int4-g64")
    ours = convcore.convert(tiny_model_factory("qwen3"), tmp_path / "ours", to="mlx", quant="int4-g64",
                            registry=affine_registry, options={"split_max_size": 300_000})
    index = json.loads((ours / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards == sorted(p.name for p in ours.glob("model-*.safetensors"))
    assert index["metadata"]["total_size"] == sum(
        r.nbytes for f in ours.glob("*.safetensors") for r in convcore.open_tensors(f)[0].values())
    assert_same_tensors(ours, theirs)
    np.testing.assert_array_equal(mlx_logits(ours), mlx_logits(theirs))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("setting", ["f16", "int4-g64"])
def test_mlx_tensor_order_is_mlx_lm_parameter_order(pair, arch, setting):
    """mlx-lm fills shards in its parameter order; ours writes in the same order, so a
    model past 5 GiB splits at the same tensors."""
    from pathlib import Path

    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    ours, theirs = pair(arch, setting)
    model, _ = load_model(Path(theirs), lazy=True)
    want = [k for k, _ in tree_flatten(model.parameters())]
    entries, _ = convcore.read_header(ours / "model.safetensors")
    assert [e.name for e in entries] == want
