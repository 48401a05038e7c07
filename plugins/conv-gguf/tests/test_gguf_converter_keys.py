"""The keys llama.cpp's converter (the one llama-cpp-python 0.3.36 vendors) writes where
ours used to differ; bench/gguf_metadata_vs_converter.py compares whole files with it."""
from __future__ import annotations

import json
import shutil

import gguf
import numpy as np

import convcore
from convcore.testing.models import tiny_model

TT = gguf.TokenType


def fields(path):
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}, \
        [t.name for t in reader.tensors]


def test_llama_keys_and_order(tmp_path):
    src = tiny_model("llama")
    kv, names = fields(convcore.convert(src, tmp_path / "l.gguf", to="gguf", quant="f16"))
    assert names[0] == "output.weight" and names[1] == "token_embd.weight"   # the source's order
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    added = [int(i) for i in cfg["added_tokens_decoder"]]
    assert all(kv["tokenizer.ggml.token_type"][i] == TT.CONTROL for i in added)   # <unk> too
    assert all(kv["tokenizer.ggml.scores"][i] == -1000.0 for i in added)
    assert kv["tokenizer.ggml.add_sep_token"] is False
    assert "tokenizer.ggml.add_space_prefix" not in kv           # llama.cpp's default: add it
    assert kv["general.size_label"] and kv["general.basename"] == "llama"


def test_gemma_keys_left_out_only_when_llama_cpp_defaults_agree(tmp_path):
    src = tiny_model("gemma2")
    kv, _ = fields(convcore.convert(src, tmp_path / "g.gguf", to="gguf", quant="f16"))
    for key in ("vocab_size", "rope.dimension_count", "rope.freq_base"):
        assert f"gemma2.{key}" not in kv
    assert kv["tokenizer.ggml.add_space_prefix"] is False
    assert kv["tokenizer.ggml.mask_token_id"] == 4
    # a base llama.cpp would not assume is still written, and still runs right
    other = tmp_path / "src"
    shutil.copytree(src, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rope_theta"] = 20000.0
    cfg.pop("rope_parameters", None)
    (other / "config.json").write_text(json.dumps(cfg))
    out = convcore.convert(other, tmp_path / "g2.gguf", to="gguf", quant="f32")
    kv, _ = fields(out)
    assert kv["gemma2.rope.freq_base"] == 20000.0
    back = convcore.convert(out, tmp_path / "hf", to="hf")
    assert convcore.hfconfig.rope_parameters(json.loads((back / "config.json").read_text()),
                                             "full_attention", "gemma2")["rope_theta"] == 20000.0
    assert np.isfinite(convcore.get_registry().infer(out, [2, 5, 9], "gguf")).all()
