"""GGUF -> HF: inverse names and transforms, rebuilt config and tokenizer."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

import convcore
from gguf_testlib import TEXT, rel_err

EXACT_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3"]
GEMMA_ARCHS = ["gemma", "gemma2", "gemma3_text"]


@pytest.mark.parametrize("arch", EXACT_ARCHS + GEMMA_ARCHS)
def test_gguf_hf_roundtrip_f32(arch, converted, tiny_model_factory, tmp_path):
    """hf -> gguf(f32) -> hf gives back every weight bit for bit (Gemma's stored 1 + w
    norms come back within one f32 ulp of 1.0), a config transformers loads, and a
    tokenizer that gives the same ids."""
    src = tiny_model_factory(arch)
    back = convcore.convert(converted(arch, "f32"), tmp_path / "hf", to="hf")
    a, b = convcore.load(src), convcore.load(back)
    expected = {n for n in a.tensors if not (n == "lm_head.weight" and a.config.get("tie_word_embeddings"))}
    assert set(b.tensors) == expected
    for name in expected:
        x, y = a.tensors[name].load(), b.tensors[name].load()
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if arch in GEMMA_ARCHS and name.endswith("norm.weight"):
            np.testing.assert_allclose(y, x, rtol=0, atol=np.spacing(np.float32(1.0)))
        else:
            np.testing.assert_array_equal(y, x, err_msg=name)
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(str(back))(TEXT)["input_ids"] == \
        AutoTokenizer.from_pretrained(str(src))(TEXT)["input_ids"]
    registry = convcore.get_registry()
    ids = AutoTokenizer.from_pretrained(str(src))(TEXT)["input_ids"]
    err = rel_err(registry.infer(back, ids, "hf"), registry.infer(src, ids, "hf"))
    assert err <= (0 if arch in EXACT_ARCHS else 1e-5), err


def test_gguf_quantized_reads_back_dequantized(converted, tmp_path):
    """A q8_0 GGUF reads back as f32 tensors equal to gguf-py's dequantization."""
    path = converted("llama", "q8_0")
    model = convcore.load(path)
    reader = gguf.GGUFReader(path)
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    ref = model.tensors["model.layers.0.mlp.down_proj.weight"]
    assert ref.dtype == "f32"
    np.testing.assert_array_equal(ref.load(), gguf.quants.dequantize(t.data, t.tensor_type))
    f16 = convcore.load(converted("llama", "f16"))
    assert f16.tensors["model.layers.0.mlp.down_proj.weight"].dtype == "f16"


def test_gguf_requantize_gguf_to_gguf(converted, tmp_path, hf_reference):
    """gguf(f32) -> gguf q8_0 equals hf -> gguf q8_0 byte for byte."""
    direct = converted("llama", "q8_0")
    via = convcore.convert(converted("llama", "f32"), tmp_path / "re.gguf", to="gguf", quant="q8_0")
    a = {t.name: t.data.tobytes() for t in gguf.GGUFReader(direct).tensors}
    b = {t.name: t.data.tobytes() for t in gguf.GGUFReader(via).tensors}
    assert a == b


@pytest.mark.llamacpp
@pytest.mark.parametrize("quant", ["q4_k_m", "q2_k", "q5_0"])
def test_gguf_reads_llama_quantize_output(quant, converted, hf_reference, tmp_path):
    """A GGUF llama-quantize made (k-quants included) reads back through gguf-py's
    dequantization; transformers on the result computes what llama.cpp computes on
    the quantized file (up to llama.cpp's 8-bit activations in quantized matmuls)."""
    from convcore.testing.llamacpp import llama_quantize
    path = llama_quantize(converted("llama", "f32"), tmp_path / f"{quant}.gguf", quant)
    back = convcore.convert(path, tmp_path / "hf", to="hf")
    ids, _ = hf_reference("llama")
    registry = convcore.get_registry()
    hf_logits = registry.infer(back, ids, "hf")
    cpp_logits = registry.infer(path, ids, "gguf")
    orig = hf_reference("llama")[1]
    # the dequantized model is much closer to llama.cpp's than either is to the original
    assert rel_err(hf_logits, cpp_logits) < 0.25 * rel_err(cpp_logits, orig)


@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_gguf_conformance(quant, tiny_llama, tmp_path):
    from convcore.testing.conformance import check_format
    out = check_format("gguf", tiny_llama, tmp_path, lossless=quant == "f32", quant=quant)
    if quant == "q8_0":
        ref = convcore.load(out).tensors["model.layers.0.mlp.up_proj.weight"]
        assert ref.stored == "q8_0" and ref.dtype == "f32"


@pytest.mark.parametrize("quant", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_m",
                                   "q4_k_m", "q5_k_m", "q6_k"])
def test_reader_dequantizes_as_gguf_py_bit_for_bit(converted, quant):
    """The reader's header walk gives gguf-py's keys, and its compiled dequantizers (the
    registered schemes) give exactly gguf-py's floats for every block type."""
    import gguf

    from conv_gguf import checks, reader

    path = converted("llama", quant)
    theirs = gguf.GGUFReader(path)
    kv = checks.read_header(path, keep_arrays=True).kv
    assert kv == {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    registry = convcore.get_registry()
    seen = set()
    for t in theirs.tensors:
        gtype = gguf.GGMLQuantizationType(t.tensor_type)
        if gtype.name in ("F32", "F16", "BF16"):
            continue
        seen.add(gtype.name)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        ours = reader._dequantizer(registry, gtype)(np.asarray(t.data), shape)
        np.testing.assert_array_equal(ours, gguf.quants.dequantize(t.data, gtype).reshape(shape))
    assert seen


@pytest.mark.parametrize("quant", ["q4_k_m", "q2_k", "q8_0"])
def test_reader_streams_rows_and_dequantizes_straight_to_f16(converted, quant, monkeypatch):
    """Tensors are dequantized a run of rows at a time (here 1-3 rows per run) with the
    values of one whole-tensor call, a k-quant tensor asked for as f16 comes out equal to
    the float32 values cast by numpy, without the float32 tensor in between, and the runs
    stream out as pieces (load_chunks) with the same values."""
    from convcore import rowblocks

    path = converted("llama", quant)
    whole = {n: r.load() for n, r in convcore.load(path).tensors.items() if r.stored}
    monkeypatch.setattr(rowblocks, "BLOCK_ELEMENTS", 1000)
    model = convcore.load(path)
    direct = 0
    for name, f32 in whole.items():
        ref = model.tensors[name]
        np.testing.assert_array_equal(ref.load(), f32)
        f16 = ref.load_as("f16")
        assert f16.dtype == np.float16 and f16.shape == f32.shape
        np.testing.assert_array_equal(f16.view(np.uint16), f32.astype(np.float16).view(np.uint16))
        for dtype, want in (("f16", f16), ("f32", f32), ("bf16", convcore.cast(f32, "bf16"))):
            pieces = list(ref.load_chunks(dtype))  # what the hf writer streams
            assert ref.chunk_loader is None or len(pieces) > 1 or f32.size <= 1000
            np.testing.assert_array_equal(np.concatenate(pieces), want.reshape(-1))
        direct += ref.cast_loader is not None
    # k-quant tensors without a row transform take the direct path; q8_0 has no f16 kernel
    assert whole and (direct > 0) == (quant != "q8_0")
