"""GGUF tokenizer keys -> HF tokenizer files that tokenize as llama.cpp does.

``tokenizer.json`` spells out what llama.cpp does with the vocabulary. A SentencePiece
vocabulary (``llama``) becomes byte-fallback BPE whose merges follow the piece scores,
behind a normalizer that writes spaces as "▁" and, with ``add_space_prefix``, prepends
one to every stretch of text (llama.cpp adds it at the start and after each special
token). Byte-level BPE (``gpt2``) gets the split regex of ``tokenizer.ggml.pre``. Control
and user-defined tokens become added tokens, ``add_bos``/``add_eos`` a template. A
WordPiece vocabulary (``bert``) is turned back in ``wordpiece.py``.

``tokenizer_config.json`` names the class. transformers 5 rebuilds a family's own class
(LlamaTokenizer, GemmaTokenizer, Qwen2Tokenizer) from settings hard-coded in the class
and keeps only the vocabulary of tokenizer.json, so the family's class
(:attr:`Arch.tokenizer_class`) is named only when those settings are the GGUF's; otherwise
the generic ``PreTrainedTokenizerFast``, which follows the file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import gguf

from .vocab import PRE_TOKENIZERS

TT = gguf.TokenType
SPACE = "\u2581"
GENERIC = "PreTrainedTokenizerFast"
# llama.cpp's special token ids for a SentencePiece vocabulary that does not state them
# (Llama's; its BPE defaults are placeholders, not tokens a tokenizer should name)
DEFAULT_IDS = {"llama": {"bos": 1, "eos": 2, "unknown": 0}}
# BPE pre-tokenizers for which llama.cpp turns off clean_spaces when detokenizing
NO_CLEAN_SPACES = {"qwen2"}

REPLACE = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}


def _model(kv: dict[str, Any]) -> str | None:
    return kv.get("tokenizer.ggml.model")


def _types(kv: dict[str, Any]) -> list[int]:
    tokens = kv["tokenizer.ggml.tokens"]
    return [int(t) for t in kv.get("tokenizer.ggml.token_type") or [TT.NORMAL] * len(tokens)]


def _space_prefix(kv: dict[str, Any]) -> bool:
    # llama.cpp: SentencePiece vocabularies prefix a space unless the key says not to
    return _model(kv) == "llama" and bool(kv.get("tokenizer.ggml.add_space_prefix", True))


def _byte_fallback(kv: dict[str, Any]) -> bool:
    return any(t == TT.BYTE for t in _types(kv))


def _special_id(kv: dict[str, Any], key: str) -> int | None:
    i = kv.get(f"tokenizer.ggml.{key}_token_id", DEFAULT_IDS.get(_model(kv), {}).get(key))
    return int(i) if isinstance(i, int) and 0 <= i < len(kv["tokenizer.ggml.tokens"]) else None


def _special(kv: dict[str, Any], key: str) -> str | None:
    i = _special_id(kv, key)
    return None if i is None else kv["tokenizer.ggml.tokens"][i]


def _adds(kv: dict[str, Any]) -> tuple[bool, bool]:
    """(add BOS, add EOS), with llama.cpp's defaults for a file without the keys."""
    bos = bool(kv.get("tokenizer.ggml.add_bos_token", _model(kv) == "llama"))
    eos = bool(kv.get("tokenizer.ggml.add_eos_token", False))
    return bos and _special(kv, "bos") is not None, eos and _special(kv, "eos") is not None


@dataclass(frozen=True)
class FamilyClass:
    """A transformers tokenizer class that hard-codes its normalizer and pre-tokenizer.

    :param fits: whether its settings are what llama.cpp does with this GGUF vocabulary.
    :param layout: tokenizer.json parts as the class builds them, so the file says what
        the class does (for readers of the file: tokenizers, mlx-lm, converters).
    :param config: tokenizer_config.json keys the class needs for this vocabulary.
    """

    fits: Callable[[dict[str, Any]], bool]
    layout: dict[str, Any]
    config: Callable[[dict[str, Any]], dict[str, Any]]


def _spm_without_prefix(kv: dict[str, Any]) -> bool:
    # GemmaTokenizer has no prefix space; LlamaTokenizer's (Metaspace) is missing before
    # text that starts with a space or follows a special token, where llama.cpp puts one.
    # Both always fall back to bytes.
    return _model(kv) == "llama" and not _space_prefix(kv) and _byte_fallback(kv)


FAMILY_CLASSES: dict[str, FamilyClass] = {
    "LlamaTokenizer": FamilyClass(
        _spm_without_prefix,
        {"normalizer": None, "pre_tokenizer": {"type": "Metaspace", "replacement": SPACE,
                                               "prepend_scheme": "never", "split": False}},
        lambda kv: {"add_prefix_space": False, "legacy": False}),
    "GemmaTokenizer": FamilyClass(
        _spm_without_prefix,
        {"normalizer": REPLACE, "pre_tokenizer": {"type": "Split", "pattern": {"String": " "},
                                                  "behavior": "MergedWithPrevious", "invert": False}},
        lambda kv: {"mask_token": "<mask>" if "<mask>" in kv["tokenizer.ggml.tokens"] else None}),
    # NFC as Qwen2 checkpoints have it: llama.cpp does not normalize, so the two differ
    # on text that is not in NFC already (as they do on the source model)
    "Qwen2Tokenizer": FamilyClass(
        lambda kv: _model(kv) == "gpt2" and kv.get("tokenizer.ggml.pre") == "qwen2",
        {"normalizer": {"type": "NFC"}},
        lambda kv: {"add_prefix_space": False}),
}


def tokenizer_class(kv: dict[str, Any], family: str | None) -> str:
    """The class tokenizer_config.json names: the architecture's family class when it
    tokenizes as llama.cpp does with this vocabulary (or is one we know nothing about),
    else the generic class that follows tokenizer.json."""
    known = FAMILY_CLASSES.get(family or "")
    if family is None or (known is not None and not known.fits(kv)):
        return GENERIC
    return family


def _added_tokens(kv: dict[str, Any]) -> list[dict[str, Any]]:
    # llama.cpp matches control, unknown and user-defined tokens in the raw text (the
    # first two only when parsing specials, as transformers does by default)
    kinds = {TT.CONTROL: True, TT.UNKNOWN: True, TT.USER_DEFINED: False}
    return [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": kinds[k]}
            for i, (t, k) in enumerate(zip(kv["tokenizer.ggml.tokens"], _types(kv))) if k in kinds]


def _template(kv: dict[str, Any]) -> dict[str, Any]:
    """BOS/EOS as a TemplateProcessing post-processor (transformers 5 reads them from
    here, not from tokenizer_config.json)."""
    add_bos, add_eos = _adds(kv)
    bos, eos = _special(kv, "bos") if add_bos else None, _special(kv, "eos") if add_eos else None

    def seq(name: str, type_id: int) -> list[dict[str, Any]]:
        return ([{"SpecialToken": {"id": bos, "type_id": type_id}}] if bos else []) + \
            [{"Sequence": {"id": name, "type_id": type_id}}] + \
            ([{"SpecialToken": {"id": eos, "type_id": type_id}}] if eos else [])
    ids = {bos: _special_id(kv, "bos"), eos: _special_id(kv, "eos")}
    return {"type": "TemplateProcessing", "single": seq("A", 0), "pair": seq("A", 0) + seq("B", 1),
            "special_tokens": {t: {"id": t, "ids": [ids[t]], "tokens": [t]} for t in (bos, eos) if t}}


def _spm_merges(kv: dict[str, Any]) -> list[list[str]]:
    """BPE merges that reproduce llama.cpp's SentencePiece merging: every split of a
    normal piece into two normal pieces, the piece with the higher score first (llama.cpp
    merges the adjacent pair whose concatenation scores highest), then by id."""
    tokens, types = kv["tokenizer.ggml.tokens"], _types(kv)
    scores = kv.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    index = {t: i for i, t in enumerate(tokens) if types[i] == TT.NORMAL}
    merges = []
    for piece, i in index.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in index and right in index:
                merges.append((-float(scores[i]), i, index[left], index[right], left, right))
    merges.sort()
    return [[m[4], m[5]] for m in merges]


def _spm_json(kv: dict[str, Any]) -> dict[str, Any]:
    """Byte-fallback BPE over the SentencePiece vocabulary, as llama.cpp tokenizes it."""
    tokens = kv["tokenizer.ggml.tokens"]
    prefix = _space_prefix(kv)
    normalizer = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPACE}, REPLACE]} \
        if prefix else REPLACE
    # a leading space is stripped on decoding only where one was prepended
    strip = [{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if prefix else []
    return {
        "normalizer": normalizer, "pre_tokenizer": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}, *strip]},
        "model": {"type": "BPE", "dropout": None, "unk_token": _special(kv, "unknown"),
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": True, "byte_fallback": _byte_fallback(kv), "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": _spm_merges(kv)},
    }


def _bpe_json(kv: dict[str, Any]) -> dict[str, Any]:
    """Byte-level BPE split by the regex llama.cpp uses for ``tokenizer.ggml.pre``."""
    tokens = kv["tokenizer.ggml.tokens"]
    regex = PRE_TOKENIZERS.get(kv.get("tokenizer.ggml.pre", ""), PRE_TOKENIZERS["gpt-2"])
    byte_level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", **byte_level}]},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ", 1) for m in kv.get("tokenizer.ggml.merges") or []]},
    }


def _tokenizer_json(kv: dict[str, Any], cls: str) -> dict[str, Any]:
    body = _spm_json(kv) if _model(kv) == "llama" else _bpe_json(kv)
    if cls in FAMILY_CLASSES:
        body.update(FAMILY_CLASSES[cls].layout)
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": _added_tokens(kv), **body, "post_processor": _template(kv)}


def _tokenizer_config(kv: dict[str, Any], cls: str, added: list[dict[str, Any]]) -> dict[str, Any]:
    add_bos, add_eos = _adds(kv)
    clean = _model(kv) == "gpt2" and kv.get("tokenizer.ggml.pre") not in NO_CLEAN_SPACES
    cfg: dict[str, Any] = {
        "tokenizer_class": cls, "clean_up_tokenization_spaces": clean,
        **{f"{name}_token": _special(kv, key) for key, name in
           (("bos", "bos"), ("eos", "eos"), ("unknown", "unk"), ("padding", "pad"))},
        "add_bos_token": add_bos, "add_eos_token": add_eos,
        **(FAMILY_CLASSES[cls].config(kv) if cls in FAMILY_CLASSES else {}),
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
    }
    if isinstance(kv.get("tokenizer.chat_template"), str):
        cfg["chat_template"] = kv["tokenizer.chat_template"]
    return cfg


def _spm_model(kv: dict[str, Any]) -> bytes:
    """tokenizer.model: a SentencePiece model proto of the pieces, scores and types."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens = kv["tokenizer.ggml.tokens"]
    scores = kv.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    proto = pb.ModelProto()
    for piece, score, kind in zip(tokens, scores, _types(kv)):
        p = proto.pieces.add()
        p.piece, p.score, p.type = piece, float(score), kind
    trainer = proto.trainer_spec
    trainer.model_type = pb.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = _byte_fallback(kv)
    for key, name in (("unknown", "unk_id"), ("bos", "bos_id"), ("eos", "eos_id"), ("padding", "pad_id")):
        i = _special_id(kv, key)
        setattr(trainer, name, -1 if i is None else i)
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = _space_prefix(kv)
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto.SerializeToString()


def tokenizer_files(kv: dict[str, Any], family: str | None = None) -> dict[str, bytes]:
    """HF tokenizer files for the vocabulary in ``kv`` (empty when there is none);
    ``family`` is the architecture's HF tokenizer class (:attr:`Arch.tokenizer_class`)."""
    if not kv.get("tokenizer.ggml.tokens"):
        return {}
    if _model(kv) == "bert":
        from .wordpiece import tokenizer_files as wordpiece_files
        return wordpiece_files(kv)
    if _model(kv) not in ("llama", "gpt2"):
        return {}
    cls = tokenizer_class(kv, family)
    tok_json = _tokenizer_json(kv, cls)
    files = {"tokenizer.json": json.dumps(tok_json, ensure_ascii=False).encode(),
             "tokenizer_config.json": json.dumps(_tokenizer_config(kv, cls, tok_json["added_tokens"]),
                                                 indent=2, ensure_ascii=False).encode()}
    if _model(kv) == "llama":
        files["tokenizer.model"] = _spm_model(kv)
    return files
