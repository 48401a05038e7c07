"""Rope scaling through GGUF: Llama-3's rope (``rope_freqs``), YaRN (its keys) and
Phi-3's LongRoPE (long/short factor tensors) as
llama.cpp's converter stores them, checked in llama.cpp on 200 tokens, past the original
context, and read back to the same HF config; ropes llama.cpp cannot run are refused."""
from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

import convcore
from convcore import ConvcoreError
from convcore.testing.models import ROPE_VARIANTS, reference_logits, rope_model, tiny_model
from gguf_testlib import rel_err

N_TOKENS = 200   # past the variants' original context of 64


def _source(variant: str):
    return rope_model(variant)


def _reference(src, ids):
    return reference_logits(src, ids)


def _ids(src) -> list[int]:
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    return [int(t) for t in np.random.default_rng(1).integers(3, vocab, size=N_TOKENS)]


@pytest.fixture(scope="module")
def rope_ggufs(tmp_path_factory):
    out = tmp_path_factory.mktemp("rope")
    return {v: convcore.convert(_source(v), out / f"{v}.gguf", to="gguf") for v in ROPE_VARIANTS}


def test_llama3_rope_is_stored_as_rope_freqs(rope_ggufs):
    reader = gguf.GGUFReader(rope_ggufs["llama3"])
    tensors = {t.name: t for t in reader.tensors}
    assert reader.tensors[0].name == "rope_freqs.weight"   # first, as llama.cpp's converter
    freqs = tensors["rope_freqs.weight"]
    assert gguf.GGMLQuantizationType(freqs.tensor_type) == gguf.GGMLQuantizationType.F32
    # head_dim 64, theta 5e5, original context 64, low/high 1/4: dims with a wavelength
    # under 16 keep their frequency, over 64 are divided by 8, the ones between ramp
    values = np.asarray(freqs.data)
    wavelen = 2 * np.pi * 500000.0 ** (np.arange(0, 64, 2) / 64)
    assert np.all(values[wavelen < 16] == 1.0) and np.all(values[wavelen > 64] == 8.0)
    ramp = values[(wavelen >= 16) & (wavelen <= 64)]
    assert len(ramp) == 3 and np.all((ramp > 1) & (ramp < 8)) and np.all(np.diff(ramp) > 0)
    assert "llama.rope.scaling.type" not in {f.name for f in reader.fields.values()}


def test_longrope_is_stored_as_factor_tensors(rope_ggufs):
    reader = gguf.GGUFReader(rope_ggufs["longrope"])
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    rope = ROPE_VARIANTS["longrope"]["rope_parameters"]
    assert np.array_equal(tensors["rope_factors_long.weight"], np.float32(rope["long_factor"]))
    assert np.array_equal(tensors["rope_factors_short.weight"], np.float32(rope["short_factor"]))
    fields = reader.fields
    assert fields["phi3.rope.scaling.original_context_length"].contents() == 64
    # transformers' default: sqrt(1 + ln(512 / 64) / ln(64))
    assert fields["phi3.rope.scaling.attn_factor"].contents() == pytest.approx(np.sqrt(1 + np.log(8) / np.log(64)))


def test_yarn_rope_keys(rope_ggufs):
    fields = gguf.GGUFReader(rope_ggufs["yarn"]).fields
    def value(key):
        return fields[key].contents()
    assert value("qwen2.rope.scaling.type") == "yarn"
    assert value("qwen2.rope.scaling.factor") == 4.0
    assert value("qwen2.rope.scaling.original_context_length") == 64
    assert value("qwen2.rope.freq_base") == 1e6


@pytest.mark.llamacpp
@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
def test_scaled_rope_logits_in_llamacpp(variant, rope_ggufs):
    src = _source(variant)
    ids = _ids(src)
    ref = _reference(src, ids)
    got = convcore.get_registry().infer(rope_ggufs[variant], ids, "gguf")
    err = rel_err(got, ref)
    assert err <= 1e-3, f"{variant}: llama.cpp vs transformers on {N_TOKENS} tokens: {err:.2e}"


@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
def test_scaled_rope_reads_back(variant, rope_ggufs, tmp_path):
    src = _source(variant)
    back = convcore.convert(rope_ggufs[variant], tmp_path / "hf", to="hf")
    theirs = json.loads((src / "config.json").read_text())["rope_parameters"]
    ours = json.loads((back / "config.json").read_text())["rope_parameters"]
    if theirs.get("partial_rotary_factor") == 1.0:   # phi3's config says the default
        theirs.pop("partial_rotary_factor")
    for key in ("long_factor", "short_factor"):   # stored as float32, as llama.cpp keeps them
        if key in theirs:
            assert np.array_equal(np.float32(ours.pop(key)), np.float32(theirs.pop(key))), key
    assert ours == theirs
    a, b = load_file(src / "model.safetensors"), load_file(back / "model.safetensors")
    assert set(b) == set(a) - {"lm_head.weight"} | ({"lm_head.weight"} & set(b))
    for name in b:
        assert np.array_equal(a[name], b[name]), name


def test_rope_llamacpp_cannot_run_is_refused(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_model("llama"), src)
    config = json.loads((src / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConvcoreError, match="rope type 'dynamic' cannot be stored in a GGUF"):
        convcore.convert(src, tmp_path / "x.gguf", to="gguf")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.llamacpp
def test_gemma3_layout_and_local_base_reach_llamacpp(tmp_path):
    """A Gemma-3 whose layers are not llama.cpp's default 5:1 and whose local rope base is
    not 10000 is written with the per-layer pattern and freq_base_swa llama.cpp reads, runs
    as transformers runs it past the window, and reads back to the same settings."""
    src = tmp_path / "src"
    shutil.copytree(tiny_model("gemma3_text", sliding_window=16, init_std=0.1), src)
    config = json.loads((src / "config.json").read_text())
    config["layer_types"] = ["sliding_attention", "full_attention"]
    config["rope_parameters"]["sliding_attention"]["rope_theta"] = 20000.0
    (src / "config.json").write_text(json.dumps(config))
    out = convcore.convert(src, tmp_path / "g.gguf", to="gguf")
    fields = gguf.GGUFReader(out).fields
    assert list(fields["gemma3.attention.sliding_window_pattern"].contents()) == [True, False]
    assert fields["gemma3.rope.freq_base_swa"].contents() == 20000.0
    ids = _ids(src)[:80]
    err = rel_err(convcore.get_registry().infer(out, ids, "gguf"), _reference(src, ids))
    assert err <= 1e-3, f"llama.cpp vs transformers: {err:.2e}"
    back = json.loads((convcore.convert(out, tmp_path / "hf", to="hf") / "config.json").read_text())
    assert back["layer_types"] == config["layer_types"]
    assert back["rope_parameters"]["sliding_attention"]["rope_theta"] == 20000.0


@pytest.mark.llamacpp
def test_yarn_explicit_attention_factor(tmp_path):
    """An explicit YaRN attention_factor scales cos/sin alone in transformers; llama.cpp
    ignores yarn_attn_factor in YaRN mode and scales by its own 1 + 0.1 ln(factor) times
    rope.scaling.attn_factor, which therefore holds the quotient (written as the converter
    does, the file is 1.7e-2 off)."""
    src = tmp_path / "src"
    shutil.copytree(rope_model("yarn"), src)
    config = json.loads((src / "config.json").read_text())
    config["rope_parameters"]["attention_factor"] = 1.0
    (src / "config.json").write_text(json.dumps(config))
    out = convcore.convert(src, tmp_path / "y.gguf", to="gguf")
    fields = gguf.GGUFReader(out).fields
    assert fields["qwen2.rope.scaling.attn_factor"].contents() == pytest.approx(1 / (1 + 0.1 * np.log(4)))
    ids = _ids(src)
    err = rel_err(convcore.get_registry().infer(out, ids, "gguf"), _reference(src, ids))
    assert err <= 1e-3, f"llama.cpp vs transformers: {err:.2e}"
    back = json.loads((convcore.convert(out, tmp_path / "hf", to="hf") / "config.json").read_text())
    assert back["rope_parameters"]["attention_factor"] == 1.0
