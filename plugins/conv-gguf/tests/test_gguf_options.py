"""Writer options, name mapping, tokenizer guesses and the CLI."""
from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest

import convcore
from gguf_testlib import TEXT, llama_tokenize


def _kv(path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}


def test_gguf_dry_run_prints_plan_writes_nothing(tiny_model_factory, tmp_path, capsys):
    dst = tmp_path / "plan.gguf"
    convcore.convert(tiny_model_factory("llama"), dst, to="gguf", quant="q8_0",
                     options={"dry_run": True})
    out = capsys.readouterr().out.splitlines()
    assert not dst.exists() and list(tmp_path.iterdir()) == []
    plan = {line.split("\t")[0]: line.split("\t")[2] for line in out}
    assert plan["blk.0.attn_q.weight"] == "q8_0"
    assert plan["blk.0.attn_norm.weight"] == "f32"
    assert plan["output.weight"] == "q8_0"
    assert len(plan) == 21
    convcore.convert(tiny_model_factory("llama"), dst, to="gguf",
                     options={"dry_run": True, "split_max_tensors": 8})
    shards = [line.split("\t")[3] for line in capsys.readouterr().out.splitlines()]
    assert shards == ["shard 1"] * 8 + ["shard 2"] * 8 + ["shard 3"] * 5
    assert list(tmp_path.iterdir()) == []


def test_gguf_vocab_only_and_metadata(tiny_model_factory, tmp_path):
    src = tiny_model_factory("qwen2")
    path = convcore.convert(src, tmp_path / "vocab.gguf", to="gguf", options={"vocab_only": True},
                            metadata={"name": "Tiny Qwen", "license": "mit",
                                      "convcore.note": "hello"})
    reader = gguf.GGUFReader(path)
    assert len(reader.tensors) == 0
    kv = _kv(path)
    assert kv["general.name"] == "Tiny Qwen" and kv["general.license"] == "mit"
    assert kv["convcore.note"] == "hello"
    assert kv["tokenizer.ggml.pre"] == "qwen2" and kv["tokenizer.ggml.model"] == "gpt2"
    assert "<|im_start|>" in kv["tokenizer.chat_template"]
    assert kv["tokenizer.ggml.eos_token_id"] == 1023 and kv["tokenizer.ggml.add_bos_token"] is False
    assert len(kv["tokenizer.ggml.merges"]) > 500


@pytest.mark.llamacpp
def test_gguf_vocab_only_tokenizes_like_transformers(tiny_model_factory, tmp_path):
    src = tiny_model_factory("qwen2")
    path = convcore.convert(src, tmp_path / "vocab.gguf", to="gguf", options={"vocab_only": True})
    from transformers import AutoTokenizer
    assert llama_tokenize(path) == AutoTokenizer.from_pretrained(str(src))(TEXT)["input_ids"]


@pytest.mark.parametrize("arch,json_only", [("llama", False), ("gemma", False), ("llama", True)])
def test_gguf_spm_vocab_records_default_pre_tokenizer(arch, json_only, tiny_model_factory, tmp_path):
    """SentencePiece vocabularies (from tokenizer.model, or a tokenizer.json converted from
    one) get tokenizer.ggml.pre = "default", as llama.cpp's converter writes."""
    src = tmp_path / "src"
    shutil.copytree(tiny_model_factory(arch), src)
    if json_only:
        (src / "tokenizer.model").unlink()
    path = convcore.convert(src, tmp_path / "spm.gguf", to="gguf", options={"vocab_only": True})
    kv = _kv(path)
    assert kv["tokenizer.ggml.model"] == "llama"
    assert kv["tokenizer.ggml.pre"] == "default"


def test_gguf_map_names(tiny_model_factory):
    model = convcore.load(tiny_model_factory("phi3"))
    names = convcore.get_registry().map_names(model, "gguf")
    assert names["model.layers.1.self_attn.qkv_proj.weight"] == "blk.1.attn_qkv.weight"
    assert names["model.layers.0.mlp.gate_up_proj.weight"] == "blk.0.ffn_up.weight"
    assert names["model.embed_tokens.weight"] == "token_embd.weight"
    assert set(names) == set(model.tensors)


@pytest.mark.llamacpp
def test_gguf_unknown_pre_tokenizer_picks_closest(tiny_model_factory, tmp_path, capfd):
    src = tmp_path / "src"
    shutil.copytree(tiny_model_factory("qwen2"), src)
    tok = json.loads((src / "tokenizer.json").read_text())
    split = tok["pre_tokenizer"]["pretokenizers"][0]
    split["pattern"]["Regex"] = split["pattern"]["Regex"].replace("(?i:", "(?:")
    (src / "tokenizer.json").write_text(json.dumps(tok))
    path = convcore.convert(src, tmp_path / "odd.gguf", to="gguf")
    assert "closest, 'qwen2'" in capfd.readouterr().err
    assert _kv(path)["tokenizer.ggml.pre"] == "qwen2"
    assert llama_tokenize(path, "hello world 42") == llama_tokenize(
        convcore.convert(tiny_model_factory("qwen2"), tmp_path / "ok.gguf", to="gguf"), "hello world 42")


@pytest.mark.llamacpp
def test_gguf_row_fallback_reported(tiny_model_factory, tmp_path, capfd):
    """A row length that is no multiple of 32 cannot be q8_0: it falls back to f16,
    the fallback is reported, and llama.cpp runs the file."""
    src = tiny_model_factory("llama", ffn=272)
    path = convcore.convert(src, tmp_path / "odd.gguf", to="gguf", quant="q8_0")
    err = capfd.readouterr().err
    assert "blk.0.ffn_down.weight: row length 272" in err and "falling back to f16" in err
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0
    logits = convcore.get_registry().infer(path, [1, 5, 9], "gguf")
    assert logits.shape == (3, 1024) and np.isfinite(logits).all()


@pytest.mark.llamacpp
def test_gguf_cli_run_split_and_inspect(tiny_model_factory, tmp_path, run_cli):
    dst = tmp_path / "cli.gguf"
    result = run_cli("run", tiny_model_factory("gemma"), "-o", dst, "--to", "gguf", "--quant", "q8_0",
                     "--split-max-tensors", "10", "--metadata", "author=me", "-q")
    assert result.returncode == 0, result.stderr
    shards = sorted(tmp_path.glob("cli-*-of-*.gguf"))
    assert [s.name for s in shards] == ["cli-00001-of-00002.gguf", "cli-00002-of-00002.gguf"]
    assert not dst.exists()
    assert _kv(shards[0])["general.author"] == "me"
    result = run_cli("validate", shards[0])
    assert result.returncode == 0, result.stderr
    result = run_cli("infer", shards[0], "--tokens", "1,2,3")
    assert result.returncode == 0, result.stderr


def test_a_split_shard_copied_over_another_is_refused(tiny_model_factory, tmp_path):
    """Shard 1 copied over shard 2: the set would read as a smaller model; loading refuses
    it and validate names the shard whose split.no disagrees with its name."""
    import shutil

    convcore.convert(tiny_model_factory("llama"), tmp_path / "s.gguf", to="gguf", quant="q8_0",
                     options={"split_max_tensors": 10})
    shards = sorted(tmp_path.glob("s-*-of-*.gguf"))
    assert len(shards) >= 2 and convcore.get_registry().validate(shards[0], "gguf") == []
    shutil.copy(shards[0], shards[1])
    message = (f"{shards[1]}: split.no 0 of split.count {len(shards)}, but its name makes it "
               f"shard 1 (from 0) of {len(shards)}")
    with pytest.raises(convcore.ConvcoreError) as info:
        convcore.load(shards[0])
    assert str(info.value) == message
    assert message in convcore.get_registry().validate(shards[0], "gguf")


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_gguf_half_source_keeps_its_precision(dtype, tiny_model_factory, tmp_path):
    """No --quant/--dtype: an f16 or bf16 source stays f16/bf16 (1-D tensors f32), and
    reads back bit for bit."""
    src = tiny_model_factory("llama", dtype=dtype)
    path = convcore.convert(src, tmp_path / "half.gguf", to="gguf")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType[dtype.upper()]
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert _kv(path)["general.file_type"] == int(gguf.LlamaFileType[f"MOSTLY_{dtype.upper()}"])
    model = convcore.load(path)
    ref = convcore.load(src)
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        np.testing.assert_array_equal(model.tensors[name].load(), ref.tensors[name].load())


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_1"])
def test_gguf_row_slices_do_not_change_bytes(quant, tiny_model_factory, tmp_path, monkeypatch):
    """Converting in slices of a few rows writes the same file as whole tensors."""
    from conv_gguf import writer
    src = tiny_model_factory("llama", dtype="bf16")
    pure = {"pure": True}  # block types only: no k-quant output tensor needed
    whole = convcore.convert(src, tmp_path / "whole.gguf", to="gguf", quant=quant, jobs=1,
                             options=pure)
    monkeypatch.setattr(writer, "CHUNK_ELEMENTS", 1000)
    sliced = convcore.convert(src, tmp_path / "sliced.gguf", to="gguf", quant=quant, jobs=3,
                              options=pure)
    assert whole.read_bytes() == sliced.read_bytes()


@pytest.mark.llamacpp
@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_gguf_spm_from_tokenizer_json_only(arch, tiny_model_factory, tmp_path):
    """A SentencePiece-converted fast tokenizer without tokenizer.model still becomes a
    llama.cpp SentencePiece vocab that tokenizes like transformers."""
    src = tmp_path / "src"
    shutil.copytree(tiny_model_factory(arch), src)
    (src / "tokenizer.model").unlink()
    path = convcore.convert(src, tmp_path / "json.gguf", to="gguf", options={"vocab_only": True})
    assert _kv(path)["tokenizer.ggml.model"] == "llama"
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(src))
    for text in (TEXT, "two  spaces\nand a newline, ünïcödé 日本"):
        assert llama_tokenize(path, text) == tok(text)["input_ids"], text
