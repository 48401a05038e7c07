"""The built-in hf format: lazy loading, bit-exact re-writes, casts, shards, .bin."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import convcore
from convcore.safetensors_io import index_shards, open_tensors, read_header


def hf_tensors(path):
    """All tensors of an HF dir as numpy, through transformers' own loader."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto")
    return {k: v.detach() for k, v in model.state_dict().items()}, model


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def stored_order(path):
    """Tensor names in the order their bytes lie in an HF dir: shard after shard as the
    index lists them, by offset within each shard (read from the headers, not the loader)."""
    index = path / "model.safetensors.index.json"
    files = index_shards(index) if index.exists() else [path / "model.safetensors"]
    return [e.name for f in files for e in sorted(read_header(f)[0], key=lambda e: e.start)]


def test_load_is_lazy_and_keeps_bf16(tiny_model_factory):
    src = tiny_model_factory("llama", dtype="bf16")
    model = convcore.load(src)
    assert model.format == "hf" and model.arch == "llama"
    ref = model.tensors["model.embed_tokens.weight"]
    assert ref.dtype == "bf16" and ref.shape == (1024, 256)
    array = ref.load()
    assert str(array.dtype) == "bfloat16"
    assert isinstance(array.base, np.memmap) or isinstance(array, np.memmap)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_hf_to_hf_is_bit_exact_on_sharded_safetensors(tiny_model_factory, tmp_path, dtype):
    src = tiny_model_factory("llama", dtype=dtype, max_shard_size="1MB")
    assert (src / "model.safetensors.index.json").exists()
    out = convcore.convert(src, tmp_path / "out", to="hf")
    a, b = convcore.load(src), convcore.load(out)
    assert stored_order(out) == stored_order(src)
    assert list(b.tensors) == list(a.tensors)
    for name, ref in a.tensors.items():
        assert same_bits(ref.load(), b.tensors[name].load()), name
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 1024
    assert (out / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()


def test_to_f16_matches_torch_cast_and_runs_in_transformers(tiny_model_factory, tmp_path):
    src = tiny_model_factory("llama", dtype="bf16", max_shard_size="1MB")
    out = convcore.convert(src, tmp_path / "f16", to="hf", dtype="f16")
    ours, model = hf_tensors(out)
    theirs, _ = hf_tensors(src)
    for name, t in theirs.items():
        assert torch.equal(ours[name], t.to(torch.float16)), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    ref_model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float16)
    ids = torch.tensor([[1, 5, 9, 300, 42]])
    with torch.no_grad():
        want = ref_model(ids).logits
        got = model(ids).logits
    assert torch.equal(got, want)


def test_split_max_size_shards_with_index(tiny_llama, tmp_path):
    out = convcore.convert(tiny_llama, tmp_path / "s", to="hf", options={"split_max_size": 2_000_000})
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(convcore.load(tiny_llama).tensors)
    for shard in shards:  # no shard beyond the limit unless it holds a single tensor
        refs, meta = open_tensors(out / shard)
        assert meta == {"format": "pt"}
        assert sum(r.nbytes for r in refs.values()) <= 2_000_000 or len(refs) == 1
    ours, _ = hf_tensors(out)
    theirs, _ = hf_tensors(tiny_llama)
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())


def test_bin_checkpoint_converts_to_f16_safetensors(tiny_model_factory, tmp_path):
    src = tiny_model_factory("llama", dtype="bf16", bin=True)
    assert (src / "pytorch_model.bin").exists() and not list(src.glob("*.safetensors"))
    model = convcore.load(src)
    assert model.tensors["model.norm.weight"].dtype == "bf16"
    out = convcore.convert(src, tmp_path / "out", to="hf", dtype="f16")
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    got, _ = open_tensors(out / "model.safetensors")
    assert set(got) == set(state)
    for name, t in state.items():
        assert np.array_equal(got[name].load(), t.to(torch.float16).numpy()), name


def test_validate_reads_a_bin_checkpoint_as_loading_does(tiny_model_factory, tmp_path):
    import shutil

    src = tmp_path / "m"
    shutil.copytree(tiny_model_factory("llama", bin=True), src)
    assert convcore.get_registry().validate(src, "hf") == []
    weights = src / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:5000])
    problems = convcore.get_registry().validate(src, "hf")
    assert len(problems) == 1 and problems[0].startswith(f"{weights}: cannot read checkpoint: ")


def test_infer_matches_transformers(tiny_llama):
    ids = [1, 20, 30, 400, 5]
    logits = convcore.get_registry().infer(tiny_llama, ids)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    assert logits.shape == (5, 1024)
    np.testing.assert_array_equal(logits, want)


def test_validate_accepts_good_and_reports_missing_tensors(tiny_model_factory, tmp_path):
    src = tiny_model_factory("llama", max_shard_size="1MB")
    out = convcore.convert(src, tmp_path / "o", to="hf", options={"split_max_size": 2_000_000})
    registry = convcore.get_registry()
    assert registry.validate(out) == []
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.extra.weight"] = next(iter(index["weight_map"].values()))
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    problems = registry.validate(out)
    assert len(problems) == 1 and "model.extra.weight" in problems[0]
