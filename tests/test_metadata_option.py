"""``--metadata KEY=VALUE`` is recorded by every writer with a place for it (gguf keys,
the safetensors header of hf and mlx, the ONNX model's metadata_props, the npz manifest,
Parquet's key-value metadata), and a key that would replace the writer's own is one line;
``--dry-run`` of the onnx export path writes nothing."""
from __future__ import annotations

import json

import pytest

import convcore
from convcore.safetensors_io import read_header
from convcore.testing.models import tiny_model

META = {"author": "convcore tests", "license": "apache-2.0"}


def _safetensors_meta(path):
    return read_header(next(path.glob("*.safetensors")))[1]


@pytest.mark.parametrize("fmt", ["hf", "mlx", "onnx", "npz", "gguf", "parquet"])
def test_metadata_is_recorded(fmt, tmp_path):
    if fmt not in convcore.get_registry().formats:
        pytest.skip(f"{fmt} plugin not installed")
    out = convcore.convert(tiny_model("llama"), tmp_path / f"out.{fmt}", to=fmt, metadata=META)
    if fmt in ("hf", "mlx"):
        got = _safetensors_meta(out)
        assert got["format"] == ("pt" if fmt == "hf" else "mlx")
    elif fmt == "onnx":
        import onnx
        got = {p.key: p.value for p in onnx.load(str(out / "model.onnx"), load_external_data=False).metadata_props}
    elif fmt == "npz":
        got = json.loads(next(out.glob("*_manifest_q*.json")).read_text())["model"]["metadata"]
    elif fmt == "gguf":
        import gguf
        reader = gguf.GGUFReader(out)
        got = {k.removeprefix("general."): reader.fields[k].contents() for k in reader.fields
               if k.removeprefix("general.") in META}
    else:
        import pyarrow.parquet as pq
        kv = pq.ParquetFile(out).schema_arrow.metadata
        got = json.loads(kv[b"convcore.metadata"])
    assert {k: got.get(k) for k in META} == META
    assert convcore.get_registry().validate(out) == []


@pytest.mark.parametrize("fmt,key", [("hf", "format"), ("mlx", "format"), ("onnx", "convcore.tensors")])
def test_a_key_the_writer_keeps_is_one_line(fmt, key, tmp_path, run_cli):
    out = tmp_path / "out"
    r = run_cli("run", tiny_model("llama"), "--to", fmt, "-o", out, "--metadata", f"{key}=x")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and key in r.stderr, r.stderr
    assert not out.exists()


@pytest.mark.full
@pytest.mark.onnx
def test_onnx_export_dry_run_writes_nothing(tmp_path, run_cli):
    out = tmp_path / "out"
    r = run_cli("run", tiny_model("phi"), "--to", "onnx", "-o", out, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "model.layers.0.self_attn.q_proj.weight.T float32[" in r.stdout
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []
