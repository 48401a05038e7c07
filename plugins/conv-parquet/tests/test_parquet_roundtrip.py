"""HF -> Parquet -> HF: bit-exact for f32, f16 and bf16 sources; the layout is what
docs/parquet.md describes (V1 columns, one row group per tensor, zstd, config and tokenizer in the
key-value metadata); Parquet -> GGUF works; split outputs are a part-file directory."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

import convcore
from convcore.testing import tree_digest
from convcore.testing.conformance import check_format
from parquet_helpers import tensors


def test_conformance(tiny_llama, tmp_path, registry):
    out = check_format("parquet", tiny_llama, tmp_path)
    assert out.is_file() and out.suffix == ".parquet"


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_hf_parquet_hf_is_bit_exact(tiny_model_factory, tmp_path, registry, dtype):
    src = tiny_model_factory("llama", dtype=dtype)
    before = tree_digest(src)
    mid = convcore.convert(src, tmp_path / "m.parquet", to="parquet")
    back = convcore.convert(mid, tmp_path / "hf", to="hf")
    assert tree_digest(src) == before
    a, b = tensors(src), tensors(back)
    assert list(a) == list(b)
    assert all(a[n] == b[n] for n in a)
    assert {n: v[0] for n, v in b.items()} == {n: dtype for n in a}
    for name in ("config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        assert (back / name).read_bytes() == (src / name).read_bytes(), name


def test_bf16_is_stored_as_bf16_bytes(tiny_model_factory, tmp_path, registry):
    src = tiny_model_factory("llama", dtype="bf16")
    out = convcore.convert(src, tmp_path / "m.parquet", to="parquet")
    table = pq.read_table(out)
    source = convcore.load(src)
    assert table.column_names == ["layer_name", "shape", "dtype", "data", "num_params"]
    for name, shape, dtype, data, numel in zip(*(table.column(c).to_pylist() for c in table.column_names)):
        ref = source.tensors[name]
        assert (shape, dtype, numel) == (list(ref.shape), "bfloat16", ref.numel)
        assert data == np.ascontiguousarray(ref.load()).tobytes()  # 2 bytes a value, as stored
        assert len(data) == 2 * numel


def test_layout_one_row_group_per_tensor_zstd_and_metadata(tiny_llama, tmp_path, registry):
    out = convcore.convert(tiny_llama, tmp_path / "m.parquet", to="parquet")
    meta = pq.read_metadata(out)
    source = convcore.load(tiny_llama)
    assert meta.num_rows == meta.num_row_groups == len(source.tensors)
    for i, name in enumerate(source.tensors):
        rg = meta.row_group(i)
        assert rg.num_rows == 1
        assert {rg.column(c).compression for c in range(rg.num_columns)} == {"ZSTD"}
        stats = rg.column(0).statistics  # layer_name: lets engines skip other row groups
        assert stats.min == stats.max == name
    kv = {k.decode(): v.decode() for k, v in meta.metadata.items()}
    assert json.loads(kv["config.json"]) == json.loads((tiny_llama / "config.json").read_text())
    assert kv["tokenizer/tokenizer.json"].encode() == (tiny_llama / "tokenizer.json").read_bytes()
    assert "tokenizer/tokenizer.model.base64" in kv  # SentencePiece's protobuf is not text
    assert kv["convcore.schema"] == "V1" and kv["convcore.arch"] == "llama"
    assert "ARROW:schema" not in kv  # it would hold the metadata a second time


def test_dtype_cast_and_config(tiny_llama, tmp_path, registry):
    out = convcore.convert(tiny_llama, tmp_path / "m.parquet", to="parquet", dtype="bf16")
    assert set(pq.read_table(out, columns=["dtype"]).column(0).to_pylist()) == {"bfloat16"}
    model = convcore.load(out)
    assert model.config["dtype"] == "bfloat16"
    source = convcore.load(tiny_llama)
    for name, ref in model.tensors.items():
        want = convcore.cast(source.tensors[name].load(), "bf16")
        assert ref.load().tobytes() == want.tobytes(), name


def test_parquet_to_gguf(tiny_llama, tmp_path, registry):
    mid = convcore.convert(tiny_llama, tmp_path / "m.parquet", to="parquet")
    gguf = convcore.convert(mid, tmp_path / "m.gguf", to="gguf")
    direct = convcore.convert(tiny_llama, tmp_path / "direct.gguf", to="gguf")
    assert registry.validate(gguf) == []
    assert tensors(gguf) == tensors(direct)  # the same model, whichever way it came


def test_quantized_parquet_to_gguf(tiny_llama, tmp_path, registry):
    mid = convcore.convert(tiny_llama, tmp_path / "m.parquet", to="parquet", quant="int8-row")
    gguf = convcore.convert(mid, tmp_path / "m.gguf", to="gguf", quant="q8_0")
    assert registry.validate(gguf) == []
    assert sorted(tensors(gguf)) == sorted(tensors(mid))


def test_split_writes_a_part_directory(tiny_llama, tmp_path, registry):
    out = convcore.convert(tiny_llama, tmp_path / "m.parquet", to="parquet",
                           options={"split_max_size": "600K"})
    parts = sorted(p.name for p in out.iterdir())
    assert out.is_dir() and len(parts) >= 3
    assert parts == [f"part-{i:05d}.parquet" for i in range(len(parts))]
    sizes = [sum(pq.read_metadata(out / p).row_group(i).total_byte_size
                 for i in range(pq.read_metadata(out / p).num_row_groups)) for p in parts]
    largest = max(r.nbytes for r in convcore.load(tiny_llama).tensors.values())
    assert all(s <= max(600_000, largest) + 4096 for s in sizes), sizes
    kv = [pq.read_metadata(out / p).metadata for p in parts]
    assert b"config.json" in kv[0] and all(b"config.json" not in m for m in kv[1:])
    assert [m[b"convcore.part"] for m in kv] == [f"{i}/{len(parts)}".encode() for i in range(len(parts))]
    assert registry.detect(out) == "parquet" and registry.validate(out) == []
    back = convcore.convert(out, tmp_path / "hf", to="hf")
    assert tensors(back) == tensors(tiny_llama)


def test_force_replaces_a_previous_split_output_only(run_cli, tiny_llama, tmp_path, registry):
    dst = tmp_path / "m.parquet"
    args = ["run", tiny_llama, "-o", dst, "--to", "parquet", "--split-max-size", "600K", "-q"]
    assert run_cli(*args).returncode == 0
    first = sorted(p.name for p in dst.iterdir())
    r = run_cli(*args)
    assert r.returncode == 1 and "already exists" in r.stderr
    r = run_cli(*args[:-1], "--split-max-size", "1M", "--force", "-q")
    assert r.returncode == 0, r.stderr
    second = sorted(p.name for p in dst.iterdir())
    assert len(second) < len(first)  # replaced, not merged with the old parts
    assert registry.validate(dst) == []
    (dst / "notes.txt").write_text("mine")
    digest = tree_digest(dst)
    r = run_cli(*args, "--force")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "holds files convcore did not write (notes.txt)" in r.stderr
    assert tree_digest(dst) == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.parquet"]  # nothing left beside it


def test_dry_run_writes_nothing(run_cli, tiny_llama, tmp_path):
    r = run_cli("run", tiny_llama, "-o", tmp_path / "m.parquet", "--to", "parquet", "--quant",
                "int4-g64", "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = dict((l.split("\t")[0], l.split("\t")[1]) for l in r.stdout.splitlines() if "\t" in l)
    assert lines["model.layers.0.mlp.up_proj.weight"] == "int4-g64"
    assert lines["model.norm.weight"] == "f32"
    assert list(tmp_path.iterdir()) == []


def test_options_are_declared_and_typed(run_cli, tiny_llama, tmp_path):
    r = run_cli("run", tiny_llama, "-o", tmp_path / "m.parquet", "--to", "parquet", "-O", "level=3")
    assert r.returncode == 1
    assert "(its options: chunk_size, compression, compression_level, dry_run, row_search, split_max_size, threads)" in r.stderr
    out = convcore.convert(tiny_llama, tmp_path / "s.parquet", to="parquet",
                           options={"compression": "snappy"})
    meta = pq.read_metadata(out)
    assert meta.row_group(0).column(3).compression == "SNAPPY"
    assert tensors(out) == tensors(tiny_llama)
