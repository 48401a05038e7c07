"""Tiny real models built on the fly: a transformers config, random weights and a real
tokenizer trained on the text shipped in ``data/corpus.txt``. No hub downloads.

Widths default to multiples of 256 so every k-quant and group size applies.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).parent / "data" / "corpus.txt"

# arch -> (config class, model class, config overrides, tokenizer kind)
ARCHS: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, "spm"),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}, "spm"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": False}, "bpe"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"use_sliding_window": False}, "bpe"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"hidden_activation": "gelu_pytorch_tanh"}, "spm"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"sliding_window": 64, "final_logit_softcapping": 30.0,
                "attn_logit_softcapping": 50.0, "query_pre_attn_scalar": 64}, "spm"),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    {"sliding_window": 64, "query_pre_attn_scalar": 64}, "spm"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": None}, "spm"),
}
TOKENIZER_VOCAB = 1024


def cache_dir() -> Path:
    root = Path(os.environ.get("CONVCORE_CACHE", Path.home() / ".cache" / "convcore"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def train_spm(directory: Path, vocab_size: int = TOKENIZER_VOCAB) -> Path:
    """Train a Llama-style SentencePiece BPE model (byte fallback) on the corpus;
    returns ``directory/tokenizer.model``."""
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=str(CORPUS), model_prefix=str(directory / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, split_digits=True,
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2, seed_sentencepiece_size=100000,
    )
    (directory / "tokenizer.vocab").unlink(missing_ok=True)
    return directory / "tokenizer.model"


def spm_tokenizer(directory: Path, vocab_size: int = TOKENIZER_VOCAB) -> Any:
    """A transformers Llama tokenizer (fast) over a freshly trained SentencePiece model;
    ``directory`` ends up holding tokenizer.model, tokenizer.json and tokenizer_config.json."""
    from transformers import AutoTokenizer

    model_file = train_spm(directory, vocab_size)
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
    }))
    tok = AutoTokenizer.from_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    assert model_file.exists()
    return tok


QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def bpe_tokenizer(directory: Path, vocab_size: int = TOKENIZER_VOCAB) -> Any:
    """A byte-level BPE tokenizer with Qwen2's pre-tokenizer, trained on the corpus."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(CORPUS)], trainer)
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, unk_token=None)
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(str(directory))
    cfg = json.loads((directory / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return fast


def make_tiny_model(
    path: str | os.PathLike,
    arch: str = "llama",
    *,
    hidden: int = 256,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    ffn: int = 512,
    dtype: str = "f32",
    tokenizer: str | None = None,
    tie: bool | None = None,
    seed: int = 0,
    init_std: float = 0.02,
    max_shard_size: str | int | None = None,
    bin: bool = False,
    **config_overrides: Any,
) -> Path:
    """Build a tiny ``arch`` model with random weights and a real tokenizer at ``path``.

    ``dtype`` is f32, f16 or bf16; ``max_shard_size`` shards the safetensors; ``bin``
    writes ``pytorch_model.bin`` instead. Returns ``path``.
    """
    import torch
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; known: {', '.join(ARCHS)}")
    config_cls, model_cls, overrides, tok_kind = ARCHS[arch]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok_kind = tokenizer or tok_kind
    tok = spm_tokenizer(path) if tok_kind == "spm" else bpe_tokenizer(path)
    vocab = len(tok)
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim or hidden // heads, max_position_embeddings=512,
        initializer_range=init_std, rms_norm_eps=1e-6,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    kwargs.update(overrides)
    if tie is not None:
        kwargs["tie_word_embeddings"] = tie
    kwargs.update(config_overrides)
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        # Norm weights start at 1 (or 0 for Gemma's 1+w); randomise them so a converter
        # that drops or mis-offsets a norm is caught.
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    torch_dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    model = model.to(torch_dtype)
    model.config.dtype = torch_dtype
    if bin:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        torch.save(state, path / "pytorch_model.bin")
        model.config.save_pretrained(str(path))
    else:
        kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(str(path), **kw)
    return path


def tiny_model(arch: str = "llama", **kwargs: Any) -> Path:
    """A cached tiny model (built once per argument set under the convcore cache dir)."""
    import transformers

    key = json.dumps({"arch": arch, "transformers": transformers.__version__,
                      "corpus": CORPUS.stat().st_size, "v": 2, **kwargs}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = cache_dir() / "tiny-models" / f"{arch}-{digest}"
    if not (path / "config.json").exists():
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        make_tiny_model(tmp, arch, **kwargs)
        try:
            tmp.rename(path)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return path
