"""Bad input: one ``error:`` line, exit != 0, no traceback, no DST, source untouched."""
from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest

import convcore
from convcore.testing import tree_digest


@pytest.fixture
def src(tiny_model_factory, tmp_path):
    """A private sharded copy of the tiny model that each test may break."""
    path = tmp_path / "src"
    shutil.copytree(tiny_model_factory("llama", max_shard_size="1MB"), path)
    return path


def expect_failure(run_cli, src, dst, *args, message):
    before = tree_digest(src)
    result = run_cli("run", src, "-o", dst, "--to", "hf", *args)
    assert result.returncode != 0
    assert result.stderr.startswith("error: ")
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert message in result.stderr, result.stderr
    assert tree_digest(src) == before
    leftovers = [p.name for p in dst.parent.iterdir() if p.name not in ("src",)]
    return result, leftovers


def test_missing_config(run_cli, src, tmp_path):
    (src / "config.json").unlink()
    _, left = expect_failure(run_cli, src, tmp_path / "out", message="config.json: missing")
    assert left == []


def test_truncated_safetensors(run_cli, src, tmp_path):
    shard = sorted(src.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    _, left = expect_failure(run_cli, src, tmp_path / "out", message="truncated")
    assert shard.name in _.stderr and left == []


def test_garbage_safetensors_header(run_cli, src, tmp_path):
    shard = sorted(src.glob("*.safetensors"))[0]
    shard.write_bytes(struct.pack("<Q", 10**15) + b"{}")
    result, left = expect_failure(run_cli, src, tmp_path / "out", message=shard.name)
    assert left == []


def test_shard_named_in_index_but_absent(run_cli, src, tmp_path):
    shard = sorted(src.glob("*.safetensors"))[1]
    shard.unlink()
    _, left = expect_failure(run_cli, src, tmp_path / "out", message=f"{shard.name!r}, which is missing")
    assert left == []


def test_unknown_dtype_in_header(run_cli, src, tmp_path):
    shard = sorted(src.glob("*.safetensors"))[0]
    raw = shard.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "F7"
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new)) if len(new) <= n else b""
    assert len(new) == n
    shard.write_bytes(raw[:8] + new + raw[8 + n:])
    _, left = expect_failure(run_cli, src, tmp_path / "out", message="unknown dtype 'F7'")
    assert left == []


def test_unknown_dtype_option(run_cli, src, tmp_path):
    _, left = expect_failure(run_cli, src, tmp_path / "out", "--quant", "q4_0",
                             message="format hf cannot store 'q4_0'")
    assert left == []


def test_dst_exists_is_refused_and_kept(run_cli, src, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    expect_failure(run_cli, src, dst, message="already exists; pass --force")
    assert (dst / "keep.txt").read_text() == "mine"
    # --force replaces only a previous output: keep.txt is the user's, so it is refused too
    expect_failure(run_cli, src, dst, "--force", message="did not write (keep.txt)")
    assert (dst / "keep.txt").read_text() == "mine"
    (dst / "keep.txt").unlink()
    ok = run_cli("run", src, "-o", dst, "--to", "hf", "--force")
    assert ok.returncode == 0, ok.stderr
    assert (dst / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_source_and_unknown_format(run_cli, tmp_path):
    r = run_cli("run", tmp_path / "nope", "-o", tmp_path / "o", "--to", "hf")
    assert r.returncode != 0 and r.stderr == f"error: {tmp_path / 'nope'}: no such file or directory\n"
    (tmp_path / "d").mkdir()
    r = run_cli("run", tmp_path / "d", "-o", tmp_path / "o", "--to", "nosuch")
    assert r.returncode != 0 and r.stderr.startswith("error: unknown format 'nosuch'")


def test_not_a_model_dir(run_cli, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("hi")
    r = run_cli("run", tmp_path / "d", "-o", tmp_path / "o", "--to", "hf")
    assert r.returncode != 0 and "no installed format recognises" in r.stderr
    assert not (tmp_path / "o").exists()


def _poison(src, name, value):
    """Put ``value`` into one element of tensor ``name`` in its shard; returns the shard."""
    from safetensors.numpy import load_file, save_file

    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = src / index["weight_map"][name]
    tensors = load_file(shard)
    bad = tensors[name].copy()
    bad.reshape(-1)[7] = value
    tensors[name] = bad
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard


@pytest.mark.parametrize("to, quant", [("hf", "f16"), ("gguf", "f16"), ("gguf", "q4_k_m"), ("mlx", "int4-g64"),
                                       ("onnx", "int4-b32"), ("parquet", "int8-row"), ("npz", "int8-row")])
def test_nan_or_inf_is_named_as_the_source_names_it(src, tmp_path, to, quant):
    """A NaN in model.layers.0.mlp.down_proj.weight is reported under that name and its
    shard, by every format (not as blk.0.ffn_down.weight), before any output appears."""
    import convcore

    if to not in convcore.get_registry().formats:
        pytest.skip(f"no {to} plugin")
    name = "model.layers.0.mlp.down_proj.weight"
    shard = _poison(src, name, float("nan"))
    before = tree_digest(src)
    dst = tmp_path / ("out.gguf" if to == "gguf" else "out.parquet" if to == "parquet" else "out")
    with pytest.raises(convcore.ConvcoreError) as info:
        convcore.convert(src, dst, to=to, quant=quant)
    assert str(info.value) == (f"{shard}: tensor {name} holds NaN or Inf values; "
                               "pass --allow-nonfinite to convert it anyway")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert tree_digest(src) == before


def test_allow_nonfinite_keeps_the_values(run_cli, src, tmp_path):
    import numpy as np
    from safetensors.numpy import load_file

    name = "model.layers.1.self_attn.q_proj.weight"
    _poison(src, name, -np.inf)
    refused = run_cli("run", src, "-o", tmp_path / "out", "--to", "hf", "-q")
    assert refused.returncode == 1 and f"tensor {name} holds NaN or Inf" in refused.stderr
    assert refused.stderr.count("\n") == 1
    done = run_cli("run", src, "-o", tmp_path / "out", "--to", "hf", "-q", "--allow-nonfinite")
    assert done.returncode == 0, done.stderr
    out = {}
    for shard in (tmp_path / "out").glob("*.safetensors"):
        out.update(load_file(shard))
    assert np.isneginf(out[name].reshape(-1)[7]) and np.isfinite(out[name]).sum() == out[name].size - 1


@pytest.mark.parametrize("dtype", ["f64", "f32", "f16", "bf16"])
def test_has_nonfinite_finds_any_nan_or_inf_and_nothing_else(dtype):
    """The pipeline's NaN/Inf check: every kind of non-finite value in any piece, and never
    the largest finite values of either sign."""
    from convcore.model import has_nonfinite

    x = convcore.cast(np.random.default_rng(0).standard_normal(2_500_003).astype(np.float32), dtype) \
        if dtype != "f64" else np.random.default_rng(0).standard_normal(2_500_003)
    assert not has_nonfinite(x)
    import ml_dtypes

    top = (ml_dtypes.finfo if dtype == "bf16" else np.finfo)(convcore.numpy_dtype(dtype)).max
    edge = x.copy()
    edge[:2] = [top, -top]
    assert not has_nonfinite(edge)
    for where in (0, 1_048_576, 2_500_002):
        for bad in (np.inf, -np.inf, np.nan):
            y = x.copy()
            y[where] = bad
            assert has_nonfinite(y), (where, bad)
