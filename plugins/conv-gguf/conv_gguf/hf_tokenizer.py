"""GGUF tokenizer keys -> HF tokenizer files.

SentencePiece vocabularies become a ``tokenizer.model`` (a SentencePiece model proto
built from the pieces, scores and types); byte-level BPE becomes a ``tokenizer.json``
whose pre-tokenizer uses the regex llama.cpp associates with ``tokenizer.ggml.pre``.
"""
from __future__ import annotations

import json
from typing import Any

import gguf

from .vocab import PRE_TOKENIZERS

TT = gguf.TokenType


def _special(kv: dict[str, Any], tokens: list[str], key: str) -> str | None:
    i = kv.get(f"tokenizer.ggml.{key}_token_id")
    if isinstance(i, int) and 0 <= i < len(tokens):
        return tokens[i]
    return None


def _config(kv: dict[str, Any], tokens: list[str], cls: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {"tokenizer_class": cls, "clean_up_tokenization_spaces": False}
    for key, name in (("bos", "bos"), ("eos", "eos"), ("unknown", "unk"), ("padding", "pad")):
        text = _special(kv, tokens, key)
        cfg[f"{name}_token"] = text
    if "tokenizer.ggml.add_bos_token" in kv:
        cfg["add_bos_token"] = bool(kv["tokenizer.ggml.add_bos_token"])
    if "tokenizer.ggml.add_eos_token" in kv:
        cfg["add_eos_token"] = bool(kv["tokenizer.ggml.add_eos_token"])
    if isinstance(kv.get("tokenizer.chat_template"), str):
        cfg["chat_template"] = kv["tokenizer.chat_template"]
    return cfg


def _spm_model(kv: dict[str, Any]) -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens = kv["tokenizer.ggml.tokens"]
    scores = kv.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = kv.get("tokenizer.ggml.token_type") or [int(TT.NORMAL)] * len(tokens)
    proto = pb.ModelProto()
    for piece, score, kind in zip(tokens, scores, types):
        p = proto.pieces.add()
        p.piece, p.score, p.type = piece, float(score), int(kind)
    trainer = proto.trainer_spec
    trainer.model_type = pb.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = any(int(t) == TT.BYTE for t in types)
    for key, field in (("unknown", "unk_id"), ("bos", "bos_id"), ("eos", "eos_id"), ("padding", "pad_id")):
        value = kv.get(f"tokenizer.ggml.{key}_token_id")
        setattr(trainer, field, int(value) if isinstance(value, int) else -1)
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(kv.get("tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto.SerializeToString()


def _spm_merges(tokens: list[str], types: list[int]) -> list[list[str]]:
    """BPE merges equivalent to a SentencePiece BPE vocabulary: every split of a normal
    piece into two known pieces, ranked by the merged piece's id (SentencePiece ids
    follow score order), then by the halves' ids."""
    index = {t: i for i, t in enumerate(tokens) if int(types[i]) == TT.NORMAL}
    merges = []
    for piece, i in index.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in index and right in index:
                merges.append((i, index[left], index[right], left, right))
    merges.sort()
    return [[left, right] for _, _, _, left, right in merges]


def _spm_json(kv: dict[str, Any]) -> dict[str, Any]:
    """A tokenizer.json (byte-fallback BPE with Metaspace) for a SentencePiece vocab, so
    fast tokenizers need no conversion from tokenizer.model."""
    tokens = kv["tokenizer.ggml.tokens"]
    types = kv.get("tokenizer.ggml.token_type") or [int(TT.NORMAL)] * len(tokens)
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i, (t, k) in enumerate(zip(tokens, types)) if int(k) in (TT.CONTROL, TT.UNKNOWN)]
    bos = _special(kv, tokens, "bos")
    add_bos = bool(kv.get("tokenizer.ggml.add_bos_token", True)) and bos is not None
    single = ([{"SpecialToken": {"id": bos, "type_id": 0}}] if add_bos else []) + \
        [{"Sequence": {"id": "A", "type_id": 0}}]
    pair = single + ([{"SpecialToken": {"id": bos, "type_id": 1}}] if add_bos else []) + \
        [{"Sequence": {"id": "B", "type_id": 1}}]
    specials = {bos: {"id": bos, "ids": [tokens.index(bos)], "tokens": [bos]}} if add_bos else {}
    prefix = bool(kv.get("tokenizer.ggml.add_space_prefix", True))
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581",
                          "prepend_scheme": "first" if prefix else "never", "split": False},
        "post_processor": {"type": "TemplateProcessing", "single": single, "pair": pair,
                           "special_tokens": specials},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1 if prefix else 0, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": _special(kv, tokens, "unknown"),
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": True, "byte_fallback": any(int(t) == TT.BYTE for t in types),
                  "ignore_merges": False, "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": _spm_merges(tokens, types)},
    }


def _bpe_json(kv: dict[str, Any]) -> dict[str, Any]:
    tokens = kv["tokenizer.ggml.tokens"]
    types = kv.get("tokenizer.ggml.token_type") or [int(TT.NORMAL)] * len(tokens)
    regex = PRE_TOKENIZERS.get(kv.get("tokenizer.ggml.pre", ""), PRE_TOKENIZERS["gpt-2"])
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": int(k) != TT.CONTROL, "special": int(k) == TT.CONTROL}
             for i, (t, k) in enumerate(zip(tokens, types)) if int(k) in (TT.CONTROL, TT.USER_DEFINED)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                           "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                    "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ", 1) for m in kv.get("tokenizer.ggml.merges") or []]},
    }


def tokenizer_files(kv: dict[str, Any]) -> dict[str, bytes]:
    """HF tokenizer files for the vocabulary in ``kv`` (empty when there is none)."""
    model = kv.get("tokenizer.ggml.model")
    tokens = kv.get("tokenizer.ggml.tokens")
    if not tokens:
        return {}
    if model == "llama":
        cfg = _config(kv, tokens, "LlamaTokenizer")
        cfg.setdefault("add_bos_token", True)
        cfg.setdefault("add_eos_token", False)
        cfg["legacy"] = False
        return {"tokenizer.model": _spm_model(kv),
                "tokenizer.json": json.dumps(_spm_json(kv), ensure_ascii=False).encode(),
                "tokenizer_config.json": json.dumps(cfg, indent=2).encode()}
    if model == "gpt2":
        cfg = _config(kv, tokens, "PreTrainedTokenizerFast")
        return {"tokenizer.json": json.dumps(_bpe_json(kv), ensure_ascii=False).encode(),
                "tokenizer_config.json": json.dumps(cfg, indent=2).encode()}
    return {}
