"""What goes under ``tokenizer.*`` in a GGUF file, as one object: the leaf both the
SentencePiece/BPE (``vocab.py``) and WordPiece (``wordpiece.py``) readers build."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Vocab:
    """What goes under ``tokenizer.*`` in a GGUF file."""

    model: str                                   # "llama" (SentencePiece), "gpt2" (BPE), "bert"
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None                       # tokenizer.ggml.pre
    special: dict[str, int] = field(default_factory=dict)   # bos/eos/unk/pad/sep/mask -> id
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_sep: bool | None = None
    token_type_count: int | None = None          # BERT's token type (segment) embeddings
    flags: dict[str, bool] = field(default_factory=dict)   # other boolean tokenizer.ggml.* keys
    add_space_prefix: bool | None = None
    chat_template: str | None = None
    warnings: list[str] = field(default_factory=list)
