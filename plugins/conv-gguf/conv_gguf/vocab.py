"""HF tokenizer files -> GGUF tokenizer keys, and back.

SentencePiece models (``tokenizer.model``) become ``tokenizer.ggml.model = "llama"`` with
pieces, scores and token types read from the model proto; byte-level BPE
(``tokenizer.json``) becomes ``"gpt2"`` with vocab, merges and a pre-tokenizer name;
WordPiece (BERT's ``tokenizer.json`` or ``vocab.txt``) becomes ``"bert"`` with the tokens
in llama.cpp's "phantom space" spelling.
llama.cpp recognises BPE pre-tokenizers by name; one we cannot name exactly is mapped
to the known one whose split regex is closest, with a warning.
"""
from __future__ import annotations

import difflib
import json
from typing import Any

import gguf

from convcore import ConvcoreError

from .vocab_model import Vocab

TT = gguf.TokenType

# llama.cpp pre-tokenizer names and the split regex each stands for (llama-vocab.cpp)
PRE_TOKENIZERS = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "gpt-2": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    # Mistral NeMo / Mistral-Small 3 (Tekken): splits at lower-to-upper case changes
    "tekken": r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
              r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
              r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}

# SentencePiece vocabularies have no pre-tokenizer; llama.cpp's converter still records
# "default" for them, and tools that read the key expect it present.
SPM_PRE = "default"


def _json(files: dict[str, bytes], name: str) -> Any:
    if name not in files:
        return None
    try:
        value = json.loads(files[name])
    except ValueError as exc:
        raise ConvcoreError(f"{name}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ConvcoreError(f"{name}: not a JSON object")
    return value


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def read_vocab(files: dict[str, bytes], config: dict[str, Any]) -> Vocab | None:
    """The GGUF vocab of an HF model's tokenizer files (None when there are none)."""
    tok_json = _json(files, "tokenizer.json")
    tok_cfg = _json(files, "tokenizer_config.json") or {}
    if "tokenizer.model" in files:
        vocab = _spm_vocab(files["tokenizer.model"], tok_json)
    elif _is_wordpiece(files, tok_json):
        from .wordpiece import wordpiece_vocab
        return wordpiece_vocab(files, tok_json, tok_cfg, config)
    elif tok_json and (tok_json.get("model") or {}).get("type") == "BPE":
        vocab = _spm_from_json(tok_json) if _is_spm_style(tok_json) else _bpe_vocab(tok_json)
    else:
        return None
    n_vocab = int(config.get("vocab_size") or len(vocab.tokens))
    for i in range(len(vocab.tokens), n_vocab):   # the embedding has rows no token uses
        vocab.tokens.append(f"[PAD{i}]")
        vocab.types.append(int(TT.UNUSED))
        if vocab.scores is not None:
            vocab.scores.append(-10000.0)
    index = {t: i for i, t in enumerate(vocab.tokens)}
    for key in ("bos", "eos", "unk", "sep", "pad", "mask"):
        text = _token_text(tok_cfg.get(f"{key}_token"))
        if text is not None and text in index:
            vocab.special[key] = index[text]
        elif key in ("bos", "eos") and isinstance(config.get(f"{key}_token_id"), int) \
                and text is None and f"{key}_token" not in tok_cfg:
            vocab.special[key] = config[f"{key}_token_id"]
    vocab.add_bos, vocab.add_eos = _adds_bos_eos(tok_json, tok_cfg, vocab.model)
    if vocab.add_sep is None:
        vocab.add_sep = _adds_sep(tok_json, tok_cfg)
    template = tok_cfg.get("chat_template")
    if "chat_template.jinja" in files:
        template = files["chat_template.jinja"].decode("utf-8")
    if isinstance(template, str):
        vocab.chat_template = template
    return vocab


def _is_wordpiece(files: dict[str, bytes], tok_json: Any) -> bool:
    """BERT-style WordPiece: tokenizer.json says so, or there is only a vocab.txt."""
    if tok_json is not None:
        return (tok_json.get("model") or {}).get("type") == "WordPiece"
    return "vocab.txt" in files


def _adds_bos_eos(tok_json: Any, tok_cfg: dict[str, Any], model: str) -> tuple[bool, bool | None]:
    """Whether transformers adds BOS / EOS: with a tokenizer.json, transformers 5 takes
    them from its post-processor alone (none there: neither) and ignores
    tokenizer_config.json's add_*_token; without one, from those flags."""
    if tok_json is not None:
        template = _post_template(tok_json) or ["$A"]
        return template[0] != "$A", template[-1] != "$A"
    add_eos = bool(tok_cfg["add_eos_token"]) if "add_eos_token" in tok_cfg else None
    # SentencePiece models add BOS unless told otherwise
    return bool(tok_cfg.get("add_bos_token", model == "llama")), add_eos


def _adds_sep(tok_json: Any, tok_cfg: dict[str, Any]) -> bool | None:
    """gguf-py's reading of a TemplateProcessing pair template (what llama.cpp's converter
    writes as ``add_sep_token``): the tokens between ``$A`` and ``$B``, the single
    template's leading and trailing specials set aside, add a separator when the sep or
    eos token is among them (the first one only without a trailing special); other tokens
    between: False; nothing between or no such template: None (the key is left out)."""
    post = _template_processing(tok_json)
    if post is None:
        return None
    single, pair = post.get("single") or [], post.get("pair") or []
    first = single[0].get("SpecialToken", {}).get("id") if len(single) > 1 else None
    last = single[-1].get("SpecialToken", {}).get("id") if len(single) > 1 else None
    if not pair:
        return None
    start = 1 if first and pair[0].get("SpecialToken", {}).get("id") == first else 0
    stop = -1 if last and pair[-1].get("SpecialToken", {}).get("id") == last else None
    pair = pair[start:stop]
    if not pair or pair[0].get("Sequence", {}).get("id") != "A" or pair[-1].get("Sequence", {}).get("id") != "B":
        return None
    middle = [p.get("SpecialToken", {}).get("id") for p in pair[1:-1]]
    if not middle:
        return None
    sep_like = {_token_text(tok_cfg.get("sep_token")), _token_text(tok_cfg.get("eos_token"))} - {None}
    return bool((middle[0] in sep_like and not last) or (len(middle) == 2 and middle[1] in sep_like))


def _template_processing(tok_json: Any) -> dict[str, Any] | None:
    """tokenizer.json's TemplateProcessing post-processor (alone or in a Sequence), or None."""
    post = (tok_json or {}).get("post_processor") or {}
    if post.get("type") == "Sequence":
        post = next((p for p in post.get("processors", []) if p.get("type") == "TemplateProcessing"), {})
    return post if post.get("type") == "TemplateProcessing" else None


def _post_template(tok_json: Any) -> list[str] | None:
    """The single-sequence template of tokenizer.json's TemplateProcessing as token texts
    with "$A" for the text (["<s>", "$A"] for Llama), or None when there is none."""
    post = _template_processing(tok_json)
    if post is None:
        return None
    return [p["SpecialToken"]["id"] if "SpecialToken" in p else "$A" for p in post.get("single", [])]


def _spm_vocab(model_bytes: bytes, tok_json: Any) -> Vocab:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(model_bytes)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ConvcoreError(f"tokenizer.model: not a SentencePiece model ({exc})") from None
    # SentencePiece piece types use the same numbers as GGUF token types (1..6).
    tokens = [p.piece for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]
    for added in (tok_json or {}).get("added_tokens", []):
        i = int(added["id"])
        if i < len(tokens):
            # as llama.cpp's converter reads added_tokens_decoder: every added token
            # scores -1000, control when special (<unk>, <s>, </s> too), else user-defined
            tokens[i], types[i] = _added(added)
            scores[i] = -1000.0
            continue
        while len(tokens) < i:
            tokens.append(f"[PAD{len(tokens)}]"); scores.append(-1000.0); types.append(int(TT.UNUSED))
        text, kind = _added(added)
        tokens.append(text); scores.append(-1000.0); types.append(kind)
    # llama.cpp's default for SentencePiece is to add the space: the key only says "no"
    return Vocab("llama", tokens, types, scores=scores, pre=SPM_PRE,
                 add_space_prefix=None if proto.normalizer_spec.add_dummy_prefix else False)


def looks_special(text: str) -> bool:
    """Added tokens llama.cpp's converter makes control tokens although tokenizer files
    call them not special (Gemma's ``<unusedN>`` and ``<mask>``, ``<|...|>`` markers)."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _user_defined(text: str) -> str:
    # llama.cpp matches user-defined tokens in the raw text, before it writes spaces as
    # "\u2581": Gemma's whitespace-run tokens ("\u2581\u2581", ...) are stored with spaces
    # (as llama.cpp's converter stores them), else they never match
    return text.replace("\u2581", " ")


def _added(token: dict[str, Any]) -> tuple[str, int]:
    """(GGUF text, token type) of a tokenizer.json added token, as llama.cpp's converter
    sets them from added_tokens_decoder."""
    text = token["content"]
    if token.get("special") or looks_special(text):
        return text, int(TT.CONTROL)
    return _user_defined(text), int(TT.USER_DEFINED)


def _is_spm_style(tok_json: dict[str, Any]) -> bool:
    """A fast tokenizer converted from SentencePiece: byte fallback or "▁" spaces."""
    text = json.dumps([tok_json.get("pre_tokenizer"), tok_json.get("normalizer")])
    return bool(tok_json["model"].get("byte_fallback")) or "Metaspace" in text or "\\u2581" in text


def _merge_scores(model: dict[str, Any]) -> dict[str, float]:
    """SentencePiece scores that order merges as tokenizer.json's merge list does: a piece
    made by the r-th merge scores -r (llama.cpp merges the adjacent pair whose piece scores
    highest). Token ids are no proxy: Llama 2's "\u2581\u2581" is id 259 but its merge
    comes 58876th, so scoring by id would merge runs of spaces first."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, -float(rank))
    return scores


def _spm_from_json(tok_json: dict[str, Any]) -> Vocab:
    """SentencePiece-style vocab from a tokenizer.json alone (no tokenizer.model): scores
    from the merge ranks (:func:`_merge_scores`); single characters, which no merge makes,
    score 0, other pieces no merge makes below every merge."""
    model = tok_json["model"]
    merged = _merge_scores(model)
    floor = -float(len(model.get("merges") or []))
    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    added = {int(a["id"]): a for a in tok_json.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    size = max(by_id) + 1 if by_id else 0
    tokens, scores, types = [], [], []
    for i in range(size):
        text = by_id.get(i, f"[PAD{i}]")
        tokens.append(text)
        scores.append(merged.get(text, 0.0 if len(text) == 1 else floor - i))
        if i not in by_id:
            types.append(int(TT.UNUSED))
        elif text == model.get("unk_token"):
            types.append(int(TT.UNKNOWN))
        elif i in added:
            tokens[-1], kind = _added(added[i])
            types.append(kind)
            scores[-1] = -1000.0
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types.append(int(TT.BYTE))
        else:
            types.append(int(TT.NORMAL))
    return Vocab("llama", tokens, types, scores=scores, pre=SPM_PRE,
                 add_space_prefix=_json_space_prefix(tok_json))


def _parts(step: Any) -> list[dict[str, Any]]:
    """A normalizer or pre-tokenizer of tokenizer.json as a flat list of its steps."""
    if not isinstance(step, dict):
        return []
    inner = step.get("normalizers") or step.get("pretokenizers") or []
    return [p for s in inner for p in _parts(s)] if step.get("type") == "Sequence" else [step]


def _json_space_prefix(tok_json: dict[str, Any]) -> bool:
    """Whether a SentencePiece-style tokenizer.json adds the dummy-prefix space: a Prepend
    normalizer (Llama 2, Phi-3) or a prepending Metaspace; Gemma's has neither."""
    for step in _parts(tok_json.get("normalizer")) + _parts(tok_json.get("pre_tokenizer")):
        if step.get("type") == "Prepend":
            return True
        if step.get("type") == "Metaspace":
            default = "always" if step.get("add_prefix_space", True) else "never"
            return step.get("prepend_scheme", default) != "never"
    return False


def _split_regexes(pre: Any) -> list[str]:
    if not isinstance(pre, dict):
        return []
    if pre.get("type") == "Sequence":
        return [r for p in pre.get("pretokenizers", []) for r in _split_regexes(p)]
    if pre.get("type") == "Split":
        pattern = pre.get("pattern") or {}
        return [pattern.get("Regex") or pattern.get("String") or ""]
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return [PRE_TOKENIZERS["gpt-2"]]
    return []


def pre_tokenizer_name(tok_json: dict[str, Any]) -> tuple[str, str | None]:
    """(llama.cpp pre-tokenizer name, warning or None) for a tokenizer.json."""
    regexes = _split_regexes(tok_json.get("pre_tokenizer"))
    if not regexes:
        return "default", "tokenizer.json: no split regex in its pre-tokenizer; using 'default'"
    regex = regexes[0]
    for name, known in PRE_TOKENIZERS.items():
        if regex == known:
            return name, None
    best = max(PRE_TOKENIZERS,
               key=lambda n: difflib.SequenceMatcher(None, regex, PRE_TOKENIZERS[n]).ratio())
    return best, (f"tokenizer.json: pre-tokenizer regex is not one llama.cpp knows; using the "
                  f"closest, {best!r} (tokenization of some texts may differ)")


def _bpe_vocab(tok_json: dict[str, Any]) -> Vocab:
    model = tok_json["model"]
    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    added = {int(a["id"]): a for a in tok_json.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    size = max(by_id) + 1 if by_id else 0
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]"); types.append(int(TT.UNUSED))
        elif i in added:
            tokens.append(by_id[i])
            types.append(int(TT.CONTROL if added[i].get("special") else TT.USER_DEFINED))
        else:
            tokens.append(by_id[i]); types.append(int(TT.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre, warning = pre_tokenizer_name(tok_json)
    vocab = Vocab("gpt2", tokens, types, merges=merges, pre=pre)
    if warning:
        vocab.warnings.append(warning)
    return vocab


def add_to_writer(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    """Write the ``tokenizer.*`` keys."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    if vocab.token_type_count is not None:
        writer.add_token_type_count(vocab.token_type_count)
    setters = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
               "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id,
               "sep": writer.add_sep_token_id, "mask": writer.add_mask_token_id}
    for key, value in vocab.special.items():
        setters[key](value)
    if vocab.add_bos is not None:
        writer.add_add_bos_token(vocab.add_bos)
    if vocab.add_eos is not None:
        writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_sep is not None:
        writer.add_add_sep_token(vocab.add_sep)
    for key, value in vocab.flags.items():
        writer.add_bool(key, value)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
