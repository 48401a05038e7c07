"""BERT's WordPiece vocabulary as llama.cpp keeps it (``tokenizer.ggml.model = "bert"``),
and back to the HF files.

llama.cpp's converter (``BertModel.set_vocab``) takes the tokens in id order as
transformers' tokenizer has them (added tokens: control when special, else user-defined;
ids no token uses: ``[PAD{i}]``, unused) and rewrites them to the "phantom space" form its
WordPiece tokenizer matches: a control token stays as it is, a continuation piece loses
its ``##``, every other token gets a leading "▁". Special ids and the add-BOS/EOS/SEP
flags come from gguf-py's ``SpecialVocab`` (BERT's [CLS] becomes the BOS id, [SEP] the
EOS and separator ids), the number of token types from ``type_vocab_size``.

llama.cpp lowercases and strips accents unless ``tokenizer.ggml.normalizer.lowercase`` /
``.strip_accents`` say otherwise; they are written only where the source tokenizer differs
from that (cased BERTs), the converter's output for uncased ones unchanged.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import gguf

from convcore import ConvcoreError

from .vocab_model import Vocab

TT = gguf.TokenType
SPACE = "\u2581"
LOWERCASE_KEY = "tokenizer.ggml.normalizer.lowercase"
STRIP_ACCENTS_KEY = "tokenizer.ggml.normalizer.strip_accents"
# the special tokens transformers' BertTokenizer adds when tokenizer_config.json names none
BERT_SPECIALS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                 "cls_token": "[CLS]", "mask_token": "[MASK]"}
# llama.cpp's ids for a "bert" vocabulary whose file does not state them (bert-base's)
DEFAULT_IDS = {"bos": 101, "unknown": 100, "seperator": 102, "padding": 0, "mask": 103}


def _looks_special(token: str) -> bool:
    """TextModel.does_token_look_special of llama.cpp's converter."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def phantom(token: str, kind: int) -> str:
    """llama.cpp's spelling of a WordPiece token (BertModel.set_vocab's ``phantom``)."""
    if kind == TT.CONTROL:
        return token
    if token.startswith("##"):
        return token[2:]
    return SPACE + token


def unphantom(token: str, kind: int) -> str:
    """The WordPiece spelling of a token of a "bert" GGUF (inverse of :func:`phantom`)."""
    if kind == TT.CONTROL:
        return token
    if token.startswith(SPACE):
        return token[1:]
    return "##" + token


def _normalizer_steps(step: Any) -> list[dict[str, Any]]:
    if not isinstance(step, dict):
        return []
    if step.get("type") == "Sequence":
        return [p for s in step.get("normalizers", []) for p in _normalizer_steps(s)]
    return [step]


def _casing(tok_json: Any, tok_cfg: dict[str, Any]) -> tuple[bool, bool]:
    """(lowercase, strip accents) of the source tokenizer, HF's way: BertNormalizer's
    strip_accents None follows lowercase."""
    if tok_json is not None:
        lower, strip = False, None
        for step in _normalizer_steps(tok_json.get("normalizer")):
            if step.get("type") == "BertNormalizer":
                lower = bool(step.get("lowercase", True))
                strip = step.get("strip_accents")
            elif step.get("type") == "Lowercase":
                lower = True
            elif step.get("type") == "StripAccents":
                strip = True
    else:
        lower, strip = bool(tok_cfg.get("do_lower_case", True)), tok_cfg.get("strip_accents")
    return lower, lower if strip is None else bool(strip)


def _from_vocab_txt(files: dict[str, bytes], tok_cfg: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer.json transformers builds from a vocab.txt (what the converter sees
    through AutoTokenizer): the named special tokens added, [CLS] $A [SEP] around text."""
    try:
        lines = files["vocab.txt"].decode("utf-8").split("\n")
    except UnicodeDecodeError:
        raise ConvcoreError("vocab.txt: not UTF-8") from None
    if lines and lines[-1] == "":
        lines.pop()
    vocab = {}
    for i, line in enumerate(lines):
        vocab.setdefault(line.rstrip("\r"), i)
    named = {}
    for key, default in BERT_SPECIALS.items():
        value = tok_cfg.get(key, default)
        named[key] = value.get("content") if isinstance(value, dict) else value
    added = [{"id": vocab[t], "content": t, "special": True} for t in dict.fromkeys(named.values())
             if t in vocab]
    cls, sep = named["cls_token"], named["sep_token"]
    post = _bert_template(cls, sep) if cls in vocab and sep in vocab else None
    return {"model": {"type": "WordPiece", "vocab": vocab}, "added_tokens": added,
            "post_processor": post}


def _bert_template(cls: str | None, sep: str | None) -> dict[str, Any]:
    """BERT's post-processor: ``[CLS] A [SEP]`` and ``[CLS] A [SEP] B [SEP]``."""
    def special(token: str | None, type_id: int) -> list[dict[str, Any]]:
        return [{"SpecialToken": {"id": token, "type_id": type_id}}] if token else []

    def sequence(name: str, type_id: int) -> list[dict[str, Any]]:
        return [{"Sequence": {"id": name, "type_id": type_id}}, *special(sep, type_id)]

    single = special(cls, 0) + sequence("A", 0)
    return {"type": "TemplateProcessing", "single": single, "pair": single + sequence("B", 1),
            "special_tokens": {}}


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _special_vocab(tok_json: dict[str, Any], tok_cfg: dict[str, Any], config: dict[str, Any],
                   n_vocab: int) -> tuple[gguf.SpecialVocab, list[str]]:
    """gguf-py's SpecialVocab of these files, as the converter builds it (it reads a
    directory, so the files go to a temporary one); its warnings are returned, not logged."""
    logger = logging.getLogger("gguf.vocab")
    handler, propagate = _Collect(), logger.propagate
    with tempfile.TemporaryDirectory(prefix="conv-gguf-vocab-") as tmp:
        for name, data in (("tokenizer.json", tok_json), ("tokenizer_config.json", tok_cfg),
                           ("config.json", config)):
            Path(tmp, name).write_text(json.dumps(data), encoding="utf-8")
        logger.addHandler(handler)
        logger.propagate = False
        try:
            special = gguf.SpecialVocab(tmp, n_vocab=n_vocab)
        finally:
            logger.removeHandler(handler)
            logger.propagate = propagate
    return special, [f"tokenizer: {m}" for m in handler.messages]


def wordpiece_vocab(files: dict[str, bytes], tok_json: Any, tok_cfg: dict[str, Any],
                    config: dict[str, Any]) -> Vocab:
    """The GGUF vocabulary of a WordPiece tokenizer, as llama.cpp's converter writes it."""
    source = tok_json if tok_json is not None else _from_vocab_txt(files, tok_cfg)
    by_id: dict[int, str] = {int(i): t for t, i in source["model"]["vocab"].items()}
    added = {int(a["id"]): a for a in source.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    size = int(config.get("vocab_size") or (max(by_id) + 1 if by_id else 0))
    if by_id and max(by_id) >= size:
        raise ConvcoreError(f"tokenizer: token id {max(by_id)} is beyond the model's vocab_size {size}")
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            token, kind = f"[PAD{i}]", TT.UNUSED
        elif i in added:
            token = by_id[i]
            if added[i].get("special") or _looks_special(token):
                kind = TT.CONTROL
            else:
                token, kind = token.replace(SPACE, " "), TT.USER_DEFINED
        else:
            token, kind = by_id[i], TT.NORMAL
        tokens.append(phantom(token, kind))
        types.append(int(kind))
    special, warnings = _special_vocab(source, tok_cfg, config, len(tokens))
    vocab = Vocab("bert", tokens, types, pre="default", warnings=warnings,
                  token_type_count=int(config.get("type_vocab_size", 1)))
    vocab.special = {k: v for k, v in special.special_token_ids.items()
                     if k in ("bos", "eos", "unk", "sep", "pad", "mask")}
    adds = special.add_special_token
    vocab.add_bos, vocab.add_eos, vocab.add_sep = adds.get("bos"), adds.get("eos"), adds.get("sep")
    lower, strip = _casing(tok_json, tok_cfg)
    if not lower:
        vocab.flags[LOWERCASE_KEY] = False
    if strip != lower:
        vocab.flags[STRIP_ACCENTS_KEY] = strip
    seen: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in seen:
            raise ConvcoreError(f"tokenizer: tokens {seen[t]} and {i} are both {t!r} in llama.cpp's "
                                "spelling of the WordPiece vocabulary, which it refuses")
        seen[t] = i
    return vocab


# GGUF -> HF --------------------------------------------------------------------------------
def _special_id(kv: dict[str, Any], key: str) -> int | None:
    """A special token id as llama.cpp reads it (its "bert" defaults where the key is absent)."""
    i = kv.get(f"tokenizer.ggml.{key}_token_id", DEFAULT_IDS.get(key))
    return i if isinstance(i, int) and 0 <= i < len(kv["tokenizer.ggml.tokens"]) else None


def tokenizer_files(kv: dict[str, Any]) -> dict[str, bytes]:
    """vocab.txt, tokenizer.json and tokenizer_config.json that tokenize as llama.cpp does
    with a "bert" vocabulary: BERT's normalizer with the file's casing, BERT's
    pre-tokenizer, WordPiece over the unspelt tokens, [CLS] text [SEP] around every text."""
    tokens = kv["tokenizer.ggml.tokens"]
    types = [int(t) for t in kv.get("tokenizer.ggml.token_type") or [TT.NORMAL] * len(tokens)]
    hf = [unphantom(t, k) for t, k in zip(tokens, types)]
    lower = bool(kv.get(LOWERCASE_KEY, True))
    strip = bool(kv.get(STRIP_ACCENTS_KEY, lower))
    names: dict[str, str | None] = {}
    for key, gkey in (("cls", "bos"), ("sep", "seperator"), ("unk", "unknown"), ("pad", "padding"),
                      ("mask", "mask")):
        i = _special_id(kv, gkey)
        names[key] = None if i is None else hf[i]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": k != TT.CONTROL, "special": k == TT.CONTROL}
             for i, (t, k) in enumerate(zip(hf, types)) if k in (TT.CONTROL, TT.USER_DEFINED)]
    index = {t: i for i, t in enumerate(hf)}
    cls, sep = names["cls"], names["sep"]
    post = _bert_template(cls, sep)
    post["special_tokens"] = {t: {"id": t, "ids": [index[t]], "tokens": [t]} for t in (cls, sep) if t}
    tok_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                       "strip_accents": strip, "lowercase": lower},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": post,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {"type": "WordPiece", "unk_token": names["unk"] or "[UNK]",
                  "continuing_subword_prefix": "##", "max_input_chars_per_word": 100,
                  "vocab": index},
    }
    cfg: dict[str, Any] = {
        "tokenizer_class": "BertTokenizer", "do_lower_case": lower, "strip_accents": strip,
        "tokenize_chinese_chars": True, "clean_up_tokenization_spaces": True,
        **{f"{k}_token": v for k, v in names.items() if v is not None},
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
    }
    arch = kv.get("general.architecture")
    if isinstance(kv.get(f"{arch}.context_length"), int):
        cfg["model_max_length"] = kv[f"{arch}.context_length"]
    return {"vocab.txt": "".join(t + "\n" for t in hf).encode("utf-8"),
            "tokenizer.json": json.dumps(tok_json, ensure_ascii=False).encode("utf-8"),
            "tokenizer_config.json": json.dumps(cfg, indent=2, ensure_ascii=False).encode("utf-8")}
