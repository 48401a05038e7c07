"""Published tokenizers (the tokenizer.json / tokenizer_config.json of Gemma-3, Gemma-2,
Gemma, Llama-3, Llama-2, Qwen3, Qwen2.5 as their repositories ship them, from the npm
registry) tokenize a real text — prose, code with spaces and tabs, CJK, emoji, runs of
spaces and newlines — the same in transformers on the source, in llama.cpp on our GGUF,
and in transformers and mlx-lm on the tokenizer rebuilt from that GGUF."""
from __future__ import annotations

import pytest

import convcore
from convcore.testing.real_tokenizers import PACKAGES, TEXT, model_with

pytestmark = pytest.mark.llamacpp


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# the default tier samples the three kinds (SentencePiece from tokenizer.json with
# whitespace-run tokens, SentencePiece BPE ranks, byte-level BPE); make test-full runs all
SAMPLE = ("gemma3", "llama2", "qwen3")


@pytest.mark.parametrize("family", [f if f in SAMPLE else pytest.param(f, marks=pytest.mark.full)
                                    for f in PACKAGES])
def test_published_tokenizer_survives_gguf(family, tmp_path):
    import llama_cpp
    from transformers import AutoTokenizer

    text = TEXT.read_text(encoding="utf-8")
    src = model_with(family, tmp_path / "src")
    tok = AutoTokenizer.from_pretrained(str(src))
    ref = tok(text)["input_ids"]
    assert len(ref) > 250
    gguf_file = convcore.convert(src, tmp_path / "vocab.gguf", to="gguf", options={"vocab_only": True})
    llm = llama_cpp.Llama(str(gguf_file), vocab_only=True, verbose=False)
    bos = tok.bos_token_id is not None and ref[0] == tok.bos_token_id
    got = llm.tokenize(text.encode(), add_bos=bos, special=True)
    llm.close()
    at = _first_difference(ref, got)
    assert at is None, (f"{family}: llama.cpp parts from transformers at token {at} of {len(ref)}: "
                        f"{tok.convert_ids_to_tokens(ref[at:at + 3])} vs {got[at:at + 3]}")
    rebuilt = tmp_path / "rebuilt"
    rebuilt.mkdir()
    for name, data in convcore.load(gguf_file).tokenizer.items():
        (rebuilt / name).write_bytes(data)
    again = AutoTokenizer.from_pretrained(str(rebuilt))(text)["input_ids"]
    at = _first_difference(ref, again)
    assert at is None, (f"{family}: the HF tokenizer rebuilt from the GGUF parts at token {at}: "
                        f"{tok.convert_ids_to_tokens(ref[at:at + 3])} vs "
                        f"{tok.convert_ids_to_tokens(again[at:at + 3])}")
    # an MLX folder made from the GGUF carries these files; mlx-lm loads them its own way
    mlx_tokenizer = pytest.importorskip("mlx_lm.tokenizer_utils").load(rebuilt)
    assert mlx_tokenizer.encode(text) == ref, f"{family}: mlx-lm's tokenizer differs"
