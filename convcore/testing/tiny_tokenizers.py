"""Tiny real tokenizers for the test kit's models, one per family, trained on
``data/corpus.txt`` and laid out as that family's real checkpoints carry theirs, so a
converter meets in tests what it meets on the hub.

:data:`FAMILIES` holds each family's settings as data; they are part of the tiny models'
cache key (see ``models.tiny_model``), so changing one rebuilds the models that use it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).parent / "data" / "corpus.txt"
# part of the cache key with FAMILIES: bump it when the builders below change their output
BUILD_VERSION = 2
VOCAB_SIZE = 1024
SPACE = "\u2581"

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

FAMILIES: dict[str, dict[str, Any]] = {
    # Llama 2, Mistral 7B v0.1, Phi-3: SentencePiece BPE with byte fallback and a dummy
    # prefix space; tokenizer.json spells that space as a Prepend normalizer, as their
    # files do (transformers' LlamaTokenizer rebuilds it as Metaspace; other classes
    # read the file).
    "llama": {
        "kind": "spm", "tokenizer_class": "LlamaTokenizer", "add_dummy_prefix": True,
        "pieces": {"unk": [0, "<unk>"], "bos": [1, "<s>"], "eos": [2, "</s>"]},
        "control": [], "add_bos_token": True, "add_eos_token": False,
        "config": {"legacy": False}, "pre_tokenizer": None, "chat_template": None,
    },
    # Gemma 1/2/3: SentencePiece BPE with byte fallback and no dummy prefix; <pad> <eos>
    # <bos> <unk> <mask> are ids 0..4, the chat-turn markers are control tokens.
    "gemma": {
        "kind": "spm", "tokenizer_class": "GemmaTokenizer", "add_dummy_prefix": False,
        "pieces": {"pad": [0, "<pad>"], "eos": [1, "<eos>"], "bos": [2, "<bos>"], "unk": [3, "<unk>"]},
        "control": ["<mask>", "<start_of_turn>", "<end_of_turn>"],
        "add_bos_token": True, "add_eos_token": False, "config": {"mask_token": "<mask>"},
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "},
                          "behavior": "MergedWithPrevious", "invert": False},
        "chat_template": "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
                         "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
                         "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
    },
    # Qwen2/Qwen3: byte-level BPE behind an NFC normalizer and Qwen2's split regex; no BOS,
    # the special tokens follow the learned vocabulary.
    "qwen2": {
        "kind": "bpe", "tokenizer_class": "Qwen2Tokenizer", "normalizer": "NFC",
        "split": QWEN2_SPLIT, "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "config": {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "unk_token": None, "add_prefix_space": False, "errors": "replace",
                   "split_special_tokens": False},
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                         "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>"
                         "assistant\n{% endif %}",
    },
}
# the names make_tiny_model(tokenizer=...) accepted before families had names
ALIASES = {"spm": "llama", "bpe": "qwen2"}


def family(name: str) -> str:
    """The family a tokenizer name (or its old alias "spm" / "bpe") stands for."""
    name = ALIASES.get(name, name)
    if name not in FAMILIES:
        raise ValueError(f"unknown tiny tokenizer {name!r}; known: {', '.join(FAMILIES)}")
    return name


def build_tokenizer(directory: Path, name: str, vocab_size: int = VOCAB_SIZE) -> Any:
    """Write family ``name``'s tokenizer files into ``directory``; returns the
    transformers tokenizer loaded back from them."""
    from transformers import AutoTokenizer

    settings = FAMILIES[family(name)]
    directory.mkdir(parents=True, exist_ok=True)
    (_spm if settings["kind"] == "spm" else _bpe)(directory, settings, vocab_size)
    return AutoTokenizer.from_pretrained(str(directory))


def _spm(directory: Path, s: dict[str, Any], vocab_size: int) -> None:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    pieces = {f"{k}_id": -1 for k in ("unk", "bos", "eos", "pad")}
    for key, (i, text) in s["pieces"].items():
        pieces[f"{key}_id"], pieces[f"{key}_piece"] = i, text
    spm.SentencePieceTrainer.train(
        input=str(CORPUS), model_prefix=str(directory / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, split_digits=True,
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        add_dummy_prefix=s["add_dummy_prefix"], normalization_rule_name="identity",
        control_symbols=s["control"], num_threads=1, minloglevel=2,
        seed_sentencepiece_size=100000, **pieces)
    (directory / "tokenizer.vocab").unlink(missing_ok=True)
    specials = {f"{k}_token": text for k, (_, text) in s["pieces"].items()}
    # transformers turns tokenizer.model into vocab + merges; the rest of tokenizer.json
    # is then set as the family's checkpoints have it
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": s["tokenizer_class"], **specials, **s["config"]}))
    AutoTokenizer.from_pretrained(str(directory)).save_pretrained(str(directory))
    tok = json.loads((directory / "tokenizer.json").read_text())
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    prepend = [{"type": "Prepend", "prepend": SPACE}] if s["add_dummy_prefix"] else []
    tok["normalizer"] = {"type": "Sequence", "normalizers": [*prepend, replace]} if prepend else replace
    tok["pre_tokenizer"] = s["pre_tokenizer"]
    strip = [{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if prepend else []
    tok["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"}, *strip]}
    tok["model"]["unk_token"] = specials.get("unk_token")
    # transformers 5 takes BOS/EOS from this template, not from tokenizer_config.json
    ids = {text: i for i, text in s["pieces"].values()}
    tok["post_processor"] = template(specials["bos_token"] if s["add_bos_token"] else None,
                                     specials["eos_token"] if s["add_eos_token"] else None, ids)
    _write(directory, tok, s, {**specials, "add_bos_token": s["add_bos_token"],
                               "add_eos_token": s["add_eos_token"]})


def _bpe(directory: Path, s: dict[str, Any], vocab_size: int) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = getattr(normalizers, s["normalizer"])()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(s["split"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(s["special"]), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(CORPUS)], trainer)
    tok.add_special_tokens(s["special"])
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(directory))
    data = json.loads((directory / "tokenizer.json").read_text())
    data["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False,
                              "trim_offsets": False, "use_regex": False}
    _write(directory, data, s, {})


def template(bos: str | None, eos: str | None, ids: dict[str, int]) -> dict[str, Any]:
    """A TemplateProcessing post-processor: ``bos`` before and ``eos`` after each sequence
    (either may be None), as transformers writes them."""
    def seq(name: str, type_id: int) -> list[dict[str, Any]]:
        return ([{"SpecialToken": {"id": bos, "type_id": type_id}}] if bos else []) + \
            [{"Sequence": {"id": name, "type_id": type_id}}] + \
            ([{"SpecialToken": {"id": eos, "type_id": type_id}}] if eos else [])
    return {"type": "TemplateProcessing", "single": seq("A", 0), "pair": seq("A", 0) + seq("B", 1),
            "special_tokens": {t: {"id": t, "ids": [ids[t]], "tokens": [t]} for t in (bos, eos) if t}}


def _write(directory: Path, tok_json: dict[str, Any], s: dict[str, Any], extra: dict[str, Any]) -> None:
    """tokenizer.json as given, and a tokenizer_config.json with only what the family's
    checkpoints carry (save_pretrained adds local paths and loader flags)."""
    (directory / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False, indent=2))
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    added = {str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                              "single_word", "special")}
             for a in tok_json["added_tokens"]}
    config = {"tokenizer_class": s["tokenizer_class"], "clean_up_tokenization_spaces": False,
              **extra, **s["config"], "added_tokens_decoder": added}
    if s["chat_template"]:
        config["chat_template"] = s["chat_template"]
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
