"""Our GGUFs in llama.cpp: same token ids and logits as transformers, and quantized
tensors as llama-quantize makes them."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

import convcore
from convcore.testing.llamacpp import llama_quantize
from gguf_testlib import ARCHS, llama_tokenize, rel_err

T = gguf.GGMLQuantizationType
pytestmark = pytest.mark.llamacpp


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_gguf_logits_match_transformers(arch, dtype, converted, hf_reference, tiny_model_factory):
    path = converted(arch, dtype)
    ids, ref = hf_reference(arch, f16=dtype == "f16")
    assert llama_tokenize(path) == ids
    if dtype == "f32":
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(tiny_model_factory(arch)))
        for text in ("two  spaces\nand a newline, ünïcödé 日本 <s>", "don't 1234567 you'll"):
            assert llama_tokenize(path, text) == tok(text)["input_ids"], text
    got = convcore.get_registry().infer(path, ids, "gguf")
    assert got.shape == ref.shape
    err = rel_err(got, ref)
    assert err <= 1e-3, f"{arch} {dtype}: max|llama.cpp - transformers| / max|transformers| = {err:.2e}"


def _types(path) -> dict[str, T]:
    return {t.name: T(t.tensor_type) for t in gguf.GGUFReader(path).tensors}


def _data(path) -> dict[str, bytes]:
    return {t.name: bytes(t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}


def _need_schemes(arch: str, quant: str, tiny_model_factory) -> None:
    """Skip when a type the plan needs has no quantizer installed (quant-rowwise)."""
    from conv_gguf import mixes, writer
    model = convcore.load(tiny_model_factory(arch))
    _, planned, _ = writer.plan(model, {"quant": quant})
    for item in planned:
        scheme = mixes.SCHEME_OF.get(item.gtype)
        if scheme and scheme not in convcore.get_registry().schemes:
            pytest.skip(f"scheme {scheme} not installed (quant-rowwise)")


BLOCK_QUANTS = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
K_QUANTS = ["q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("quant", BLOCK_QUANTS + K_QUANTS)
def test_gguf_quant_types_and_bytes_match_llama_quantize(arch, quant, converted, gguf_dir,
                                                         tiny_model_factory):
    """Every tensor gets the type llama-quantize gives it from our f32 file; block-quant
    tensors (q8_0 ... q5_1) are byte-identical to llama-quantize's."""
    _need_schemes(arch, quant, tiny_model_factory)
    ours = converted(arch, quant)
    theirs = llama_quantize(converted(arch, "f32"), gguf_dir / f"{arch}-{quant}-llamacpp.gguf", quant)
    our_types, their_types = _types(ours), _types(theirs)
    assert our_types == their_types
    if quant in BLOCK_QUANTS:
        default = T[quant.upper()]
        a, b = _data(ours), _data(theirs)
        same_type = [n for n, t in our_types.items() if t == default]
        assert same_type
        differ = [n for n in same_type if a[n] != b[n]]
        assert not differ, f"{quant}: tensors differ from llama-quantize: {differ}"


@pytest.fixture(scope="session")
def long_reference(tiny_model_factory):
    """``long_reference(arch) -> (128 token ids of shipped text, transformers f32 logits)``:
    quantization error measured over many positions, so one token does not decide it."""
    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from convcore.testing.models import CORPUS
            src = tiny_model_factory(arch)
            text = CORPUS.read_text()[5000:6000]
            ids = AutoTokenizer.from_pretrained(str(src))(text)["input_ids"][:128]
            model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
            with torch.no_grad():
                cache[arch] = ids, model(torch.tensor([ids])).logits[0].float().numpy()
        return cache[arch]

    return get


def rms_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("quant", BLOCK_QUANTS + K_QUANTS)
def test_gguf_quant_error_no_worse_than_llama_quantize(arch, quant, converted, long_reference, gguf_dir,
                                                       tiny_model_factory):
    """Logit error vs transformers (||llama.cpp - transformers|| / ||transformers|| over 128
    positions) within 1.1x of llama-quantize's.

    llama-quantize is run on our f16 file, as the issue asks, and on our f32 file: the
    same quantizer on those two inputs differs by up to ~10 % on these tiny models, which
    is the noise floor of this comparison; ours must stay within 1.1x of the worse of the
    two (and the figures are printed for the record)."""
    _need_schemes(arch, quant, tiny_model_factory)
    ids, ref = long_reference(arch)
    registry = convcore.get_registry()
    ours = rms_err(registry.infer(converted(arch, quant), ids, "gguf"), ref)
    from_f16 = llama_quantize(converted(arch, "f16"), gguf_dir / f"{arch}-{quant}-from-f16.gguf", quant)
    from_f32 = llama_quantize(converted(arch, "f32"), gguf_dir / f"{arch}-{quant}-from-f32.gguf", quant)
    theirs16 = rms_err(registry.infer(from_f16, ids, "gguf"), ref)
    theirs32 = rms_err(registry.infer(from_f32, ids, "gguf"), ref)
    print(f"{arch} {quant}: ours {ours:.4f}, llama-quantize from f16 {theirs16:.4f}, from f32 {theirs32:.4f}")
    assert ours <= 1.1 * max(theirs16, theirs32), \
        f"{quant}: ours {ours:.4f} vs llama-quantize {theirs16:.4f} (f16) / {theirs32:.4f} (f32)"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("quant", BLOCK_QUANTS)
def test_gguf_pure_block_quants_byte_identical(arch, quant, converted, gguf_dir):
    """With llama-quantize's --pure every 2-D weight gets the file type's block type,
    so all of them can be compared byte for byte with llama.cpp's quantization."""
    ours = converted(arch, quant, pure=True)
    theirs = llama_quantize(converted(arch, "f32"), gguf_dir / f"{arch}-{quant}-pure.gguf", quant,
                            pure=True)
    our_types = _types(ours)
    assert our_types == _types(theirs)
    quantized = [n for n, t in our_types.items() if t == T[quant.upper()]]
    assert len(quantized) == sum(1 for n in our_types if n.endswith("weight") and "norm" not in n)
    a, b = _data(ours), _data(theirs)
    differ = [n for n in quantized if a[n] != b[n]]
    assert not differ, f"{quant}: tensors differ from llama-quantize: {differ}"


def test_gguf_split_loads_in_llama_cpp(converted, hf_reference):
    whole = converted("llama", "f32")
    first = converted("llama", "f32", split_max_tensors=8)
    assert first.name.endswith("-00001-of-00003.gguf")
    shards = sorted(first.parent.glob(first.name.replace("00001-of", "*-of")))
    assert len(shards) == 3
    r = gguf.GGUFReader(first)
    assert r.fields["split.count"].contents() == 3
    assert r.fields["split.tensors.count"].contents() == len(gguf.GGUFReader(whole).tensors)
    ids, _ = hf_reference("llama")
    registry = convcore.get_registry()
    np.testing.assert_array_equal(registry.infer(first, ids, "gguf"), registry.infer(whole, ids, "gguf"))
    # and reads back to the same weights
    a, b = convcore.load(whole), convcore.load(first)
    assert list(a.tensors) == list(b.tensors)
    for name in a.tensors:
        np.testing.assert_array_equal(a.tensors[name].load(), b.tensors[name].load())


def test_gguf_split_max_size_string(converted):
    first = converted("llama", "f32", split_max_size="2M")
    shards = sorted(first.parent.glob(first.name.replace("00001-of", "*-of")))
    assert len(shards) >= 2
    assert all(s.stat().st_size < 2_000_000 + 1_100_000 for s in shards)


@pytest.mark.parametrize("arch,kw", [("llama", {"layers": 8}), ("qwen2", {}), ("phi3", {}),
                                     ("gemma", {})])
def test_gguf_mix_plan_matches_llama_quantize(arch, kw, tiny_model_factory, tmp_path):
    """For every file type, the type planned for each tensor is the one llama-quantize
    picks from our f32 file (tied embeddings, fused qkv, layer-dependent bumps)."""
    from conv_gguf import mixes, writer
    src = tiny_model_factory(arch, **kw)
    f32 = convcore.convert(src, tmp_path / "f32.gguf", to="gguf", quant="f32")
    model = convcore.load(src)
    for quant in BLOCK_QUANTS + K_QUANTS:
        _, planned, _ = writer.plan(model, {"quant": quant})
        ours = {p.name: p.gtype for p in planned}
        theirs = _types(llama_quantize(f32, tmp_path / f"{quant}.gguf", quant))
        assert ours == theirs, (quant, {n: (ours[n], theirs[n]) for n in ours if ours[n] != theirs.get(n)})
        assert mixes.FILE_TYPES[quant][1] in ours.values()


@pytest.mark.parametrize("arch,kw", [
    ("gemma2", {}),                       # 150 tokens: past the 64-token sliding window
    ("gemma3_text", {"layers": 7}),       # local and global layers, two rope bases
    ("qwen3", {"head_dim": 128}),         # head_dim != hidden / heads
    ("qwen2", {"tie": True}),             # tied embeddings: no output.weight
])
def test_gguf_long_sequence_and_shapes(arch, kw, tiny_model_factory, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM
    src = tiny_model_factory(arch, **kw)
    path = convcore.convert(src, tmp_path / "m.gguf", to="gguf", quant="f32")
    ids = [1] + np.random.default_rng(0).integers(3, 1000, 150).tolist()
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    err = rel_err(convcore.get_registry().infer(path, ids, "gguf"), ref)
    assert err <= 1e-3, err
