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

from .tiny_tokenizers import BUILD_VERSION, CORPUS, FAMILIES, VOCAB_SIZE, build_tokenizer, family

# arch -> (config class, model class, config overrides, tokenizer family; see tiny_tokenizers)
ARCHS: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, "llama"),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}, "llama"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": False}, "qwen2"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"use_sliding_window": False}, "qwen2"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"hidden_activation": "gelu_pytorch_tanh"}, "gemma"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"sliding_window": 64, "final_logit_softcapping": 30.0,
                "attn_logit_softcapping": 50.0, "query_pre_attn_scalar": 64}, "gemma"),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    {"sliding_window": 64, "query_pre_attn_scalar": 64}, "gemma"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": None}, "llama"),
}
TOKENIZER_VOCAB = VOCAB_SIZE


def cache_dir() -> Path:
    root = Path(os.environ.get("CONVCORE_CACHE", Path.home() / ".cache" / "convcore"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def spm_tokenizer(directory: Path, vocab_size: int = TOKENIZER_VOCAB) -> Any:
    """A Llama-2 style SentencePiece tokenizer written into ``directory`` (bench/ uses it)."""
    return build_tokenizer(directory, "llama", vocab_size)


def bpe_tokenizer(directory: Path, vocab_size: int = TOKENIZER_VOCAB) -> Any:
    """A Qwen2 style byte-level BPE tokenizer written into ``directory``."""
    return build_tokenizer(directory, "qwen2", vocab_size)


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

    ``dtype`` is f32, f16 or bf16; ``tokenizer`` names a tokenizer family of
    ``tiny_tokenizers.FAMILIES`` (default: the arch's own); ``max_shard_size`` shards the
    safetensors; ``bin`` writes ``pytorch_model.bin`` instead. Returns ``path``.
    """
    import torch
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; known: {', '.join(ARCHS)}")
    config_cls, model_cls, overrides, tok_family = ARCHS[arch]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path, tokenizer or tok_family)
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

    if arch not in ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; known: {', '.join(ARCHS)}")
    # the tokenizer family's settings are part of the key: changing them rebuilds
    tok = FAMILIES[family(kwargs.get("tokenizer") or ARCHS[arch][3])]
    key = json.dumps({"arch": arch, "transformers": transformers.__version__,
                      "corpus": CORPUS.stat().st_size, "v": 3, "tokenizer_settings": tok,
                      "tokenizer_build": BUILD_VERSION, **kwargs}, sort_keys=True)
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
