"""Broken MLX dirs give one-line problems from validate and one-line errors on load."""
from __future__ import annotations

import json
import shutil

import pytest

import convcore


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_model_factory, affine_registry):
    root = tmp_path_factory.mktemp("mlxgood")
    return convcore.convert(tiny_model_factory("llama"), root / "q4", to="mlx", quant="int4-g64",
                            registry=affine_registry, options={"split_max_size": 400_000})


def rewrite(path, change):
    """Rewrite every shard of ``path`` through ``change(name, array) -> (name, array) | None``."""
    for file in sorted(path.glob("*.safetensors")):
        refs, meta = convcore.open_tensors(file)
        arrays = {}
        for name, ref in refs.items():
            out = change(name, ref.load().copy())
            if out is not None:
                arrays[out[0]] = out[1]
        tmp = file.with_suffix(".tmp")
        w = convcore.StreamingWriter(tmp, [(n, convcore.dtype_name(a.dtype), a.shape) for n, a in arrays.items()], meta)
        for n, a in arrays.items():
            w.write(n, a)
        w.close()
        tmp.replace(file)


def broken_copy(good, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    return bad


def test_mlx_good_dir_is_valid_and_sharded(good, affine_registry):
    assert affine_registry.validate(good) == []
    index = json.loads((good / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0].startswith("model-00001-of-")
    assert index["metadata"]["total_parameters"] == 1705216


def check_broken(bad, registry, run_cli, words):
    problems = registry.validate(bad)
    assert problems and all("\n" not in p for p in problems)
    assert any(all(w in p for w in words) for p in problems), problems
    with pytest.raises(convcore.ConvcoreError) as exc:
        with convcore.using(registry):
            convcore.convert(bad, bad.parent / "hf", to="hf", registry=registry)
    assert "\n" not in str(exc.value)
    r = run_cli("validate", bad)
    assert r.returncode == 1 and r.stderr.startswith("invalid: ")
    r = run_cli("run", bad, "-o", bad.parent / "out", "--to", "hf")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    assert not (bad.parent / "out").exists()


def test_mlx_scales_missing(good, tmp_path, affine_registry, run_cli):
    bad = broken_copy(good, tmp_path)
    rewrite(bad, lambda n, a: None if n == "model.layers.0.mlp.up_proj.scales" else (n, a))
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.0.mlp.up_proj.scales"]
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    check_broken(bad, affine_registry, run_cli, ["model.layers.0.mlp.up_proj", "scales is missing"])


def test_mlx_packed_width_wrong(good, tmp_path, affine_registry, run_cli):
    bad = broken_copy(good, tmp_path)
    rewrite(bad, lambda n, a: (n, a[:, :-8]) if n == "model.layers.1.self_attn.q_proj.weight" else (n, a))
    check_broken(bad, affine_registry, run_cli, ["model.layers.1.self_attn.q_proj", "packed width 24"])


def test_mlx_shard_missing(good, tmp_path, affine_registry, run_cli):
    bad = broken_copy(good, tmp_path)
    (bad / "model-00002-of-00003.safetensors").unlink()
    check_broken(bad, affine_registry, run_cli, ["model-00002-of-00003.safetensors", "missing"])


def test_mlx_config_says_quantized_but_weights_are_float(tmp_path, tiny_model_factory, affine_registry, run_cli):
    bad = convcore.convert(tiny_model_factory("llama"), tmp_path / "bad", to="mlx", registry=affine_registry)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization"] = cfg["quantization_config"] = {"group_size": 64, "bits": 4, "mode": "affine"}
    (bad / "config.json").write_text(json.dumps(cfg))
    problems = affine_registry.validate(bad)
    assert problems == [f"{bad / 'config.json'}: quantization block present but no tensor has scales"]


def test_mlx_unsupported_scheme_and_arch_are_one_line(tmp_path, tiny_model_factory, run_cli):
    r = run_cli("run", tiny_model_factory("llama"), "-o", tmp_path / "x", "--to", "mlx", "--quant", "q4_0")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "cannot store 'q4_0'" in r.stderr


def test_mlx_writer_refuses_unknown_architecture(tmp_path, tiny_model_factory, run_cli):
    src = tmp_path / "src"
    shutil.copytree(tiny_model_factory("llama"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "olmo"
    (src / "config.json").write_text(json.dumps(cfg))
    r = run_cli("run", src, "-o", tmp_path / "x", "--to", "mlx")
    assert r.returncode != 0 and r.stderr.count("\n") == 1
    assert "architecture 'olmo' is not supported" in r.stderr
    assert not (tmp_path / "x").exists()
