"""BERT encoders (sentence-embedding models) as llama.cpp's converter writes them: keys,
tensors and the "phantom space" WordPiece vocabulary; llama.cpp tokenizes and embeds as
the source does; quantized files; GGUF -> HF; the runtime session of an encoder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

import convcore
from convcore.testing.models import tiny_encoder

T = gguf.GGMLQuantizationType
TT = gguf.TokenType
SPACE = "\u2581"
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "hello world, this is a test of the tokenizer!",
    "Zyxqv blorptastic wibbleflarn quuxified?!",            # unknown words, split or [UNK]
    "Numbers: 3.14, 42 and 1234567; punctuation... (yes) [no] {maybe}",
    "UPPER and MiXeD case, café naïve ünïcödé, 日本 語",
]
LAYERS = 2   # tiny_encoder's
PER_BLOCK = ("attn_q", "attn_k", "attn_v", "attn_output", "attn_output_norm", "ffn_up", "ffn_down",
             "layer_output_norm")
EXPECTED_TENSORS = {f"{n}.{s}" for n in ("token_embd_norm",) for s in ("weight", "bias")} | {
    "token_embd.weight", "token_types.weight", "position_embd.weight"} | {
    f"blk.{i}.{n}.{s}" for i in range(LAYERS) for n in PER_BLOCK for s in ("weight", "bias")}
ALWAYS_F32 = {"token_types.weight", "position_embd.weight"}


def _fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _types(path) -> dict[str, T]:
    return {t.name: T(t.tensor_type) for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def encoder() -> Path:
    return tiny_encoder()


@pytest.fixture(scope="module")
def bert_gguf(encoder, tmp_path_factory):
    """``bert_gguf(quant) -> Path``: tiny_encoder as GGUF, each quant converted once."""
    out = tmp_path_factory.mktemp("bert")
    cache: dict = {}

    def get(quant: str) -> Path:
        if quant not in cache:
            cache[quant] = convcore.convert(encoder, out / f"bert-{quant}.gguf", to="gguf", quant=quant)
        return cache[quant]

    return get


def _phantom(vocab_txt: Path) -> list[str]:
    """The tokens as llama.cpp's converter spells them, from vocab.txt."""
    out = []
    for tok in vocab_txt.read_text(encoding="utf-8").splitlines():
        if tok in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"):
            out.append(tok)
        elif tok.startswith("##"):
            out.append(tok[2:])
        else:
            out.append(SPACE + tok)
    return out


def test_bert_gguf_keys_tensors_and_vocabulary(encoder, bert_gguf):
    """f16: exactly the keys and tensors llama.cpp's converter writes for a BertModel
    (pooler dropped; norms, biases, position and token-type embeddings f32), the
    WordPiece vocabulary in phantom-space spelling, the specials as control tokens."""
    path = bert_gguf("f16")
    fields = _fields(path)
    config = json.loads((encoder / "config.json").read_text())
    vocab = (encoder / "vocab.txt").read_text(encoding="utf-8").splitlines()
    ids = {t: i for i, t in enumerate(vocab)}
    expected = {
        "general.architecture": "bert", "general.type": "model", "general.name": encoder.name,
        "bert.context_length": 512, "bert.embedding_length": 256, "bert.feed_forward_length": 512,
        "bert.block_count": LAYERS, "bert.attention.head_count": 4,
        "bert.attention.causal": False,
        "bert.pooling_type": 1,                         # 1_Pooling/config.json: mean
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_F16),
        "general.quantization_version": gguf.GGML_QUANT_VERSION,
        "tokenizer.ggml.model": "bert", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.token_type_count": 2,
        "tokenizer.ggml.bos_token_id": ids["[CLS]"], "tokenizer.ggml.eos_token_id": ids["[SEP]"],
        "tokenizer.ggml.unknown_token_id": ids["[UNK]"],
        "tokenizer.ggml.seperator_token_id": ids["[SEP]"],
        "tokenizer.ggml.padding_token_id": ids["[PAD]"], "tokenizer.ggml.mask_token_id": ids["[MASK]"],
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True,
        "tokenizer.ggml.add_sep_token": False,
    }
    # the model card's keys, as llama.cpp's converter reads them with gguf-py's Metadata
    card = gguf.Metadata.load(None, encoder, None, 0)
    expected.update({"general.name": card.name, "general.basename": card.basename,
                     "general.finetune": card.finetune})
    arrays = {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
              "bert.attention.layer_norm_epsilon", "general.size_label", "general.tags"}
    assert set(fields) == set(expected) | arrays
    assert {k: fields[k] for k in expected} == expected
    assert fields["bert.attention.layer_norm_epsilon"] == pytest.approx(config["layer_norm_eps"], rel=1e-6)
    assert list(fields["tokenizer.ggml.tokens"]) == _phantom(encoder / "vocab.txt")
    control = {ids[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")}
    assert [int(t) for t in fields["tokenizer.ggml.token_type"]] == \
        [TT.CONTROL if i in control else TT.NORMAL for i in range(len(vocab))]
    types = _types(path)
    assert set(types) == EXPECTED_TENSORS
    for name, gtype in types.items():
        f32 = name in ALWAYS_F32 or not name.endswith(".weight") or name.endswith("_norm.weight")
        assert gtype == (T.F32 if f32 else T.F16), name
    assert convcore.get_registry().validate(path) == []


def test_bert_vocab_txt_alone_gives_the_same_vocabulary(encoder, bert_gguf, tmp_path):
    """A BERT with vocab.txt and no tokenizer.json (older checkpoints): the tokenizer keys
    are those transformers' tokenizer built from vocab.txt leads to, the same as with it."""
    src = tmp_path / "vocab-txt"
    shutil.copytree(encoder, src, ignore=shutil.ignore_patterns("tokenizer.json"))
    path = convcore.convert(src, tmp_path / "vocab-txt.gguf", to="gguf", quant="f16")
    ours = {k: v for k, v in _fields(path).items() if k.startswith("tokenizer.")}
    with_json = {k: v for k, v in _fields(bert_gguf("f16")).items() if k.startswith("tokenizer.")}
    assert ours == with_json


def test_bert_masked_lm_checkpoint_and_cased_vocabulary(encoder, tmp_path):
    """A BertForMaskedLM checkpoint ("bert." names, MLM head) gives the same tensors as
    a BertModel, the head and position ids dropped as llama.cpp drops them; a cased
    tokenizer says so in the key llama.cpp reads (it lowercases by default); a model
    without sentence-transformers files gets no pooling type, as from llama.cpp's
    converter."""
    import torch
    import transformers

    src = tmp_path / "mlm"
    src.mkdir()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(encoder / name, src / name)
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["normalizer"]["lowercase"] = False
    (src / "tokenizer.json").write_text(json.dumps(tok))
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**cfg, "do_lower_case": False}))
    config = transformers.BertConfig.from_pretrained(str(encoder))
    config.architectures = ["BertForMaskedLM"]
    torch.manual_seed(1)
    transformers.BertForMaskedLM(config).save_pretrained(str(src))
    names = set(convcore.load(src).tensors)
    assert any(n.startswith("cls.predictions.") for n in names) and all(
        n.startswith(("bert.", "cls.")) for n in names)
    path = convcore.convert(src, tmp_path / "mlm.gguf", to="gguf", quant="f32")
    assert set(_types(path)) == EXPECTED_TENSORS
    fields = _fields(path)
    assert fields["tokenizer.ggml.normalizer.lowercase"] is False
    assert "tokenizer.ggml.normalizer.strip_accents" not in fields   # follows lowercase
    assert "bert.pooling_type" not in fields
    back = convcore.load(path)
    assert back.config["architectures"] == ["BertModel"]
    src_model = convcore.load(src)
    np.testing.assert_array_equal(back.tensors["embeddings.word_embeddings.weight"].load(),
                                  src_model.tensors["bert.embeddings.word_embeddings.weight"].load())


def test_bert_pooling_llama_cpp_cannot_do_is_refused(encoder, tmp_path):
    src = tmp_path / "maxpool"
    shutil.copytree(encoder, src)
    pooling = json.loads((src / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_max_tokens=True)
    (src / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    with pytest.raises(convcore.ConvcoreError, match="max_tokens pooling; llama.cpp pools by mean, "
                                                      "cls or last token only"):
        convcore.convert(src, tmp_path / "maxpool.gguf", to="gguf")
    assert not (tmp_path / "maxpool.gguf").exists()


@pytest.mark.llamacpp
@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_bert_quant_types_match_llama_quantize(quant, bert_gguf, tmp_path):
    """Quantized BERT files: every tensor has the type llama-quantize gives it from our
    f32 file (position and token-type embeddings, norms and biases stay f32; the tied
    token embedding is treated as the output), and q8_0 tensors are byte-identical."""
    from convcore.testing.llamacpp import llama_quantize

    ours = bert_gguf(quant)
    theirs = llama_quantize(bert_gguf("f32"), tmp_path / f"bert-{quant}-llamacpp.gguf", quant)
    assert _types(ours) == _types(theirs)
    assert {n: t for n, t in _types(ours).items() if n in ALWAYS_F32} == dict.fromkeys(ALWAYS_F32, T.F32)
    if quant == "q8_0":
        a = {t.name: bytes(t.data.tobytes()) for t in gguf.GGUFReader(ours).tensors}
        b = {t.name: bytes(t.data.tobytes()) for t in gguf.GGUFReader(theirs).tensors}
        assert a == b


@pytest.mark.llamacpp
def test_bert_llama_cpp_tokenizes_as_transformers(encoder, bert_gguf):
    import llama_cpp
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(encoder))
    llm = llama_cpp.Llama(str(bert_gguf("f16")), embedding=True, verbose=False)
    try:
        for text in SENTENCES:
            assert llm.tokenize(text.encode(), add_bos=True) == tok(text).input_ids, text
    finally:
        llm.close()


@pytest.mark.llamacpp
def test_bert_cased_vocabulary_tokenizes_as_transformers(encoder, tmp_path):
    """With ``tokenizer.ggml.normalizer.lowercase = false`` llama.cpp keeps the case, as
    the cased source tokenizer does."""
    import llama_cpp
    from transformers import AutoTokenizer

    src = tmp_path / "cased"
    shutil.copytree(encoder, src)
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["normalizer"]["lowercase"] = False
    (src / "tokenizer.json").write_text(json.dumps(tok))
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**cfg, "do_lower_case": False}))
    path = convcore.convert(src, tmp_path / "cased.gguf", to="gguf", quant="f16")
    hf = AutoTokenizer.from_pretrained(str(src))
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        for text in SENTENCES:
            assert llm.tokenize(text.encode(), add_bos=True) == hf(text).input_ids, text
        assert hf("The THE the").input_ids[1:4] != AutoTokenizer.from_pretrained(
            str(encoder))("The THE the").input_ids[1:4]   # the case does matter here
    finally:
        llm.close()


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


@pytest.mark.llamacpp
@pytest.mark.parametrize("quant,min_cos", [("f32", 0.999), ("f16", 0.999), ("q8_0", 0.99)])
def test_bert_embeddings_match_sentence_transformers(quant, min_cos, encoder, bert_gguf):
    """llama.cpp's pooled embedding (mean, from the file) against sentence-transformers
    (mean pooling, then its Normalize module): cosine of the normalised vectors."""
    st = pytest.importorskip("sentence_transformers")
    import llama_cpp

    model = st.SentenceTransformer(str(encoder), device="cpu")
    llm = llama_cpp.Llama(str(bert_gguf(quant)), embedding=True, verbose=False)
    try:
        for text in SENTENCES:
            got, ref = llm.embed(text), model.encode(text)
            assert len(got) == len(ref) == 256
            cos = float(np.dot(_unit(got), _unit(ref)))
            assert cos >= min_cos, f"{quant} {text!r}: cosine {cos:.6f}"
    finally:
        llm.close()


def test_bert_gguf_to_hf_round_trip(encoder, bert_gguf, tmp_path):
    """gguf(f32) -> hf: every weight bit for bit (the pooler, which the GGUF does not
    hold, is the only one missing), a BertModel config and tokenizer transformers load,
    the same last hidden states as the source; the pooling comes back as
    sentence-transformers files."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = bert_gguf("f32")
    back = convcore.convert(path, tmp_path / "hf", to="hf")
    src, got, gg = convcore.load(encoder), convcore.load(back), convcore.load(path)
    assert set(got.tensors) == set(src.tensors) - {"pooler.dense.weight", "pooler.dense.bias"}
    for name, ref in got.tensors.items():
        y = ref.load()
        np.testing.assert_array_equal(y, gg.tensors[name].load(), err_msg=name)
        np.testing.assert_array_equal(y, src.tensors[name].load(), err_msg=name)
    config = json.loads((back / "config.json").read_text())
    assert config["architectures"] == ["BertModel"] and config["model_type"] == "bert"
    assert "rope_parameters" not in config and "bos_token_id" not in config
    tok_src, tok_back = AutoTokenizer.from_pretrained(str(encoder)), AutoTokenizer.from_pretrained(str(back))
    vocab_src = (encoder / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert (back / "vocab.txt").read_text(encoding="utf-8").splitlines() == vocab_src
    a, b = AutoModel.from_pretrained(str(encoder)).eval(), AutoModel.from_pretrained(str(back)).eval()
    for text in SENTENCES:
        ids = tok_src(text).input_ids
        assert tok_back(text).input_ids == ids, text
        with torch.no_grad():
            ha = a(torch.tensor([ids])).last_hidden_state
            hb = b(torch.tensor([ids])).last_hidden_state
        np.testing.assert_allclose(hb.numpy(), ha.numpy(), rtol=0, atol=1e-5)
    if "companions" in getattr(convcore.Model, "__dataclass_fields__", {}):
        pooling = json.loads((back / "1_Pooling" / "config.json").read_text())
        assert pooling["pooling_mode_mean_tokens"] is True and pooling["word_embedding_dimension"] == 256


@pytest.mark.llamacpp
def test_bert_session_embeds_and_has_no_logits(encoder, bert_gguf, converted):
    """``open_session`` on an encoder GGUF: kind "encoder", ``embed`` is what
    ``Llama.embed`` returns, ``hidden_states`` are transformers' last hidden states up to
    llama.cpp's GELU, ``logits`` is a one-line error; decoder files stay decoders."""
    import llama_cpp
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(encoder))
    path = bert_gguf("f32")
    llm = llama_cpp.Llama(str(path), embedding=True, verbose=False)
    model = AutoModel.from_pretrained(str(encoder)).eval()
    registry = convcore.get_registry()
    with registry.open_session(path) as s:
        assert s.kind == "encoder"
        for text in SENTENCES:
            ids = tok(text).input_ids
            got = s.embed(ids)
            assert got.dtype == np.float32 and got.shape == (256,)
            np.testing.assert_allclose(got, np.asarray(llm.embed(text), dtype=np.float32), rtol=0, atol=1e-6)
            with torch.no_grad():
                ref = model(torch.tensor([ids])).last_hidden_state[0].numpy()
            hidden = s.hidden_states(ids)
            assert hidden.shape == ref.shape
            np.testing.assert_allclose(hidden, ref, rtol=0, atol=2e-3)
            np.testing.assert_allclose(got, hidden.mean(axis=0), rtol=0, atol=1e-5)   # mean pooling
        with pytest.raises(convcore.ConvcoreError, match=r"bert is an embedding model; it has no logits$"):
            s.logits(tok(SENTENCES[0]).input_ids)
        with pytest.raises(convcore.ConvcoreError, match="outside the vocabulary"):
            s.embed([2, 10**6, 3])
    llm.close()
    with registry.open_session(converted("llama", "f32"), options={"n_ctx": 64}) as s:
        assert s.kind == "decoder"


@pytest.mark.llamacpp
def test_bert_session_pools_by_mean_without_a_pooling_type(encoder, tmp_path):
    """A file without ``bert.pooling_type`` (a BERT without sentence-transformers files):
    llama.cpp would give per-token vectors; the session pools by mean, as
    sentence-transformers does for such a model."""
    src = tmp_path / "plain"
    shutil.copytree(encoder, src, ignore=shutil.ignore_patterns("modules.json", "1_Pooling"))
    path = convcore.convert(src, tmp_path / "plain.gguf", to="gguf", quant="f32")
    assert "bert.pooling_type" not in _fields(path)
    ids = [2, 100, 200, 300, 3]
    with convcore.get_registry().open_session(path) as s:
        np.testing.assert_allclose(s.embed(ids), s.hidden_states(ids).mean(axis=0), rtol=0, atol=1e-5)
