"""WeightLoader: a lazy mapping that reads one row group per tensor (bytes read are
measured), plain files other tools write load too, and a target that needs a config
the file lacks says so in one line."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

import convcore
from conv_parquet import WeightLoader
from parquet_helpers import hf_dir, plain_v1, rchar, tensors


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """Eight 2 MB f32 tensors (random, so zstd cannot shrink them much) and a norm."""
    rng = np.random.default_rng(3)
    arrays = {f"layers.{i}.w": rng.standard_normal((512, 1024), dtype=np.float32) for i in range(8)}
    arrays["norm.weight"] = rng.standard_normal(1024, dtype=np.float32)
    root = tmp_path_factory.mktemp("big")
    return hf_dir(root / "src", arrays), arrays


def test_mapping_and_get_layer(tiny_llama, tmp_path, registry):
    out = convcore.convert(tiny_llama, tmp_path / "m.parquet", to="parquet")
    weights = WeightLoader(out)
    source = convcore.load(tiny_llama)
    assert list(weights.keys()) == list(source.tensors) and len(weights) == len(source.tensors)
    assert "lm_head.weight" in weights and "nope" not in weights
    name = "model.layers.1.mlp.down_proj.weight"
    assert weights.get_layer(name).tobytes() == source.tensors[name].load().tobytes()
    assert weights[name].shape == source.tensors[name].shape
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        weights["nope"]
    everything = weights.load_weights()
    assert {n: a.tobytes() for n, a in everything.items()} == {
        n: r.load().tobytes() for n, r in source.tensors.items()}
    assert weights.config["model_type"] == "llama" and weights.schema_version == 1
    assert weights.tokenizer["tokenizer.model"] == (tiny_llama / "tokenizer.model").read_bytes()
    assert weights.info(name)["row_group"] == list(source.tensors).index(name)


def test_get_layer_reads_only_that_row_group(big, tmp_path, registry):
    src, arrays = big
    out = convcore.convert(src, tmp_path / "m.parquet", to="parquet")
    weights = WeightLoader(out)
    weights.get_layer("layers.0.w")  # first use: lazy imports read files too
    meta = pq.read_metadata(out)
    for i, name in enumerate(arrays):
        if arrays[name].ndim < 2:
            continue
        start = rchar()
        array = weights.get_layer(name)
        read = rchar() - start
        chunk = meta.row_group(i).column(3).total_compressed_size
        assert np.array_equal(array, arrays[name])
        assert chunk <= read <= 1.2 * arrays[name].nbytes, (name, read, chunk)
        assert read <= 1.05 * chunk + 4096  # the data column chunk, nothing of the others


def test_v2_get_layer_reads_only_that_row_group(big, tmp_path, registry):
    src, arrays = big
    out = convcore.convert(src, tmp_path / "m.parquet", to="parquet", quant="int8-row")
    weights = WeightLoader(out)
    weights.get_layer("layers.0.w")
    start = rchar()
    weights.get_layer("layers.5.w")
    read = rchar() - start
    quantized = 512 * 1024 + 2 * 4 * 512  # int8 codes + f32 scales and zero points
    assert read <= 1.2 * quantized, read


def test_torch_tensors_on_request(tiny_model_factory, tmp_path, registry):
    torch = pytest.importorskip("torch")
    src = tiny_model_factory("llama", dtype="bf16")
    out = convcore.convert(src, tmp_path / "m.parquet", to="parquet")
    name = "model.layers.0.self_attn.q_proj.weight"
    raw = convcore.load(src).tensors[name].load()
    t = WeightLoader(out, device="cpu").get_layer(name)
    assert t.dtype == torch.bfloat16 and tuple(t.shape) == raw.shape
    assert t.view(torch.int16).numpy().tobytes() == raw.tobytes()
    t32 = WeightLoader(out, dtype="f32")[name]
    assert t32.dtype == torch.float32 and np.array_equal(t32.numpy(), raw.astype(np.float32))
    with pytest.raises(convcore.ConvcoreError, match="unknown torch dtype"):
        WeightLoader(out, dtype="float7")


def test_plain_files_without_metadata_load(tmp_path, registry):
    rng = np.random.default_rng(0)
    arrays = {"w": rng.standard_normal((4, 8), dtype=np.float32),
              "h": convcore.cast(rng.standard_normal((2, 3), dtype=np.float32), "bf16"),
              "i": np.arange(5, dtype=np.int32)}
    plain = plain_v1(tmp_path / "plain.parquet", arrays)  # all rows in one row group
    assert pq.read_metadata(plain).num_row_groups == 1 and b"config.json" not in pq.read_metadata(plain).metadata
    assert convcore.get_registry().detect(plain) == "parquet"
    weights = WeightLoader(plain)
    assert weights.config is None
    assert {n: weights[n].tobytes() for n in weights} == {n: a.tobytes() for n, a in arrays.items()}
    model = convcore.load(plain)
    assert model.arch == "unknown" and model.config == {}
    assert {n: r.dtype for n, r in model.tensors.items()} == {"w": "f32", "h": "bf16", "i": "i32"}
    assert convcore.get_registry().validate(plain) == []
    # parquet -> parquet needs no config
    again = convcore.convert(plain, tmp_path / "again.parquet", to="parquet")
    assert tensors(again) == tensors(plain)


def test_a_target_that_needs_a_config_says_so(run_cli, tmp_path):
    plain = plain_v1(tmp_path / "plain.parquet", {"w": np.ones((4, 8), np.float32)})
    r = run_cli("run", plain, "-o", tmp_path / "hf", "--to", "hf")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: {plain}: has no config.json in its metadata, and format hf "
                               "needs the model's config")
    assert not (tmp_path / "hf").exists()


def test_a_config_beside_a_plain_file_is_used(tiny_llama, tmp_path, registry):
    source = convcore.load(tiny_llama)
    arrays = {n: r.load() for n, r in source.tensors.items()}
    folder = tmp_path / "exported"
    folder.mkdir()
    plain = plain_v1(folder / "weights.parquet", arrays)
    for name in ("config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_llama / name).read_bytes())
    back = convcore.convert(plain, tmp_path / "hf", to="hf")
    assert tensors(back) == tensors(tiny_llama)
    assert (back / "tokenizer.model").read_bytes() == (tiny_llama / "tokenizer.model").read_bytes()
