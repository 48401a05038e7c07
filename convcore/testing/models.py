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
    # more dense families, with their published settings: OLMo-2's q/k norms over the whole
    # projection and post-norms; Granite-3's four multipliers; SmolLM3's rope-less every
    # 4th layer; StarCoder2's biases, LayerNorm and GELU; Phi-2's partial rotary and
    # parallel attention + MLP
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {"rope_theta": 500000.0}, "qwen2"),
    "granite": ("GraniteConfig", "GraniteForCausalLM",
                {"embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                 "attention_multiplier": 0.015625, "logits_scaling": 8.0}, "qwen2"),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM",
                {"no_rope_layer_interval": 4, "use_sliding_window": False, "pad_token_id": None}, "qwen2"),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM",
                   {"use_bias": True, "hidden_act": "gelu_pytorch_tanh", "norm_epsilon": 1e-5,
                    "sliding_window": None}, "qwen2"),
    "phi": ("PhiConfig", "PhiForCausalLM",
            {"partial_rotary_factor": 0.5, "hidden_act": "gelu_new", "layer_norm_eps": 1e-5}, "qwen2"),
    # mixtures of experts with their families' routing: Mixtral's 8 experts, top 2;
    # Qwen1.5/2-MoE's shared expert and gate, unnormalized top-k; Qwen3-MoE's normalized top-k
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                {"num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": None}, "llama"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 256,
                   "shared_expert_intermediate_size": 512, "norm_topk_prob": False,
                   "use_sliding_window": False}, "qwen2"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 256,
                   "norm_topk_prob": True, "use_sliding_window": False}, "qwen2"),
}
TOKENIZER_VOCAB = VOCAB_SIZE
# Rope scaling as the Hub's long-context checkpoints set it (Llama-3.1/3.2's llama3 rope,
# Qwen2.5's yarn), with the original context shrunk to 64 tokens so that a 200-token test
# runs past it and the scaling changes the logits. ``tiny_model(arch, **ROPE_VARIANTS[k])``
# (longrope's factors fit phi3's head of 64).
ROPE_VARIANTS: dict[str, dict[str, Any]] = {
    "llama3": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}},
    "yarn": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                                 "original_max_position_embeddings": 64},
             "max_position_embeddings": 256},
    # Phi-3-128k's LongRoPE: per-frequency long/short factors, original context 64 of 512
    "longrope": {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                     "long_factor": [1.0 + 0.5 * i for i in range(32)],
                                     "short_factor": [1.0 + 0.02 * i for i in range(32)],
                                     "original_max_position_embeddings": 64},
                 "original_max_position_embeddings": 64},
}


# the family each rope variant is published with (Llama-3.2 tied; Qwen2.5; Phi-3 128k)
ROPE_ARCHS = {"llama3": ("llama", {"tie": True}), "yarn": ("qwen2", {}), "longrope": ("phi3", {})}


def rope_model(variant: str) -> Path:
    """The cached tiny model of ``variant``'s family with that rope (ROPE_VARIANTS)."""
    arch, extra = ROPE_ARCHS[variant]
    return tiny_model(arch, **extra, **ROPE_VARIANTS[variant])


def reference_logits(path: str | os.PathLike, ids: list[int]) -> Any:
    """transformers' float32 logits of the model at ``path`` for ``ids`` (one sequence)."""
    import torch
    import transformers

    config = json.loads((Path(path) / "config.json").read_text())
    cls = getattr(transformers, (config.get("architectures") or ["AutoModelForCausalLM"])[0], None) \
        or transformers.AutoModelForCausalLM
    model = cls.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


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


def _perturbed(model: Any, dtype: str) -> Any:
    """``model`` with its 1-D weights moved off their init values and cast to ``dtype``.

    Norm weights start at 1 (0 for Gemma's 1+w) and biases at 0; randomising them catches
    a converter that drops, swaps or mis-offsets one."""
    import torch

    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    torch_dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    model = model.to(torch_dtype)
    model.config.dtype = torch_dtype
    return model


#: Llama-3-70B's config (hidden 8192, 80 layers, vocabulary 128256): what convcore fake's
#: tests and benchmark generate weights for
LLAMA_70B_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
    "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
    "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "hidden_act": "silu", "initializer_range": 0.02,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}


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
    model = _perturbed(model, dtype)
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
    # the arch's own settings are part of the key too: changing them rebuilds
    key = json.dumps({"arch": arch, "transformers": transformers.__version__,
                      "corpus": CORPUS.stat().st_size, "v": 3, "tokenizer_settings": tok,
                      "tokenizer_build": BUILD_VERSION, "arch_settings": ARCHS[arch][2], **kwargs},
                     sort_keys=True)
    return _cached(f"{arch}-{hashlib.sha256(key.encode()).hexdigest()[:16]}",
                   lambda tmp: make_tiny_model(tmp, arch, **kwargs))


def _cached(name: str, build: Any, marker: str = "config.json") -> Path:
    """``cache_dir()/tiny-models/name``, made by ``build(tmp_dir)`` the first time (in a
    temporary sibling renamed into place, so concurrent test processes never see half)."""
    path = cache_dir() / "tiny-models" / name
    if not (path / marker).exists():
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return path


# sentence embeddings ---------------------------------------------------------------------
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4, as BERT has them
POOLINGS = ("mean", "cls", "max")
# The sentence-transformers layout written below is the one its 2.x-5.x releases save and
# hub checkpoints (all-MiniLM-L6-v2, bge, e5, ...) carry; newer releases still load it.
ST_LAYOUT_VERSION = "3.0.1"
ST_MAX_SEQ_LENGTH = 128


def wordpiece_tokenizer(directory: Path, vocab_size: int = TOKENIZER_VOCAB) -> Any:
    """A lowercasing BERT WordPiece tokenizer trained on the shipped corpus, written into
    ``directory`` as BERT checkpoints carry it: ``vocab.txt``, ``tokenizer.json``,
    ``tokenizer_config.json`` and ``special_tokens_map.json``. Returns the transformers
    tokenizer loaded back from those files."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import AutoTokenizer, BertTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    trainer = BertWordPieceTokenizer(lowercase=True, clean_text=True, handle_chinese_chars=True,
                                     strip_accents=None)
    trainer.train([str(CORPUS)], vocab_size=vocab_size, min_frequency=2, show_progress=False,
                  special_tokens=list(BERT_SPECIALS), limit_alphabet=1000, wordpieces_prefix="##")
    trainer.save_model(str(directory))  # vocab.txt, one token a line in id order
    vocab = {tok: i for i, tok in enumerate(
        (directory / "vocab.txt").read_text(encoding="utf-8").splitlines())}
    for i, tok in enumerate(BERT_SPECIALS):
        if vocab.get(tok) != i:
            raise RuntimeError(f"wordpiece training put {tok} at {vocab.get(tok)}, not {i}")
    fast = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=512)
    fast.save_pretrained(str(directory))
    # save_pretrained records where it loaded from and how; checkpoints carry neither
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    specials = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                "cls_token": "[CLS]", "mask_token": "[MASK]"}
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return AutoTokenizer.from_pretrained(str(directory))


def _sentence_transformers_files(path: Path, hidden: int, pooling: str, normalize: bool) -> None:
    """modules.json, sentence_bert_config.json, config_sentence_transformers.json,
    ``1_Pooling/config.json`` and a model card, as sentence-transformers saves a BERT
    model with a Pooling (and Normalize) module."""
    import torch
    import transformers

    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    (path / "modules.json").write_text(json.dumps(modules, indent=2))
    (path / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": ST_MAX_SEQ_LENGTH, "do_lower_case": False}, indent=2))
    (path / "config_sentence_transformers.json").write_text(json.dumps({
        "__version__": {"sentence_transformers": ST_LAYOUT_VERSION,
                        "transformers": transformers.__version__,
                        "pytorch": torch.__version__.split("+")[0]},
        "prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine",
    }, indent=2))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": pooling == "max",
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    }, indent=4))
    steps = f"{pooling} pooling" + (", then L2 normalization" if normalize else "")
    (path / "README.md").write_text(f"""---
library_name: sentence-transformers
pipeline_tag: sentence-similarity
tags:
- sentence-transformers
- feature-extraction
- sentence-similarity
- convcore-test-fixture
---

# tiny-encoder

A tiny BERT sentence-embedding model built by `convcore.testing.make_tiny_encoder` for
tests: random weights, a WordPiece vocabulary trained on a small bundled text. It maps
sentences to a {hidden}-dimensional vector ({steps}); the vectors mean nothing.

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("path/to/this/directory")
embeddings = model.encode(["first sentence", "second sentence"])
```
""")


def make_tiny_encoder(
    path: str | os.PathLike,
    *,
    hidden: int = 256,
    layers: int = 2,
    heads: int = 4,
    ffn: int = 512,
    seed: int = 0,
    pooling: str = "mean",
    normalize: bool = True,
    dtype: str = "f32",
) -> Path:
    """Build a tiny BERT sentence-embedding model at ``path``, laid out as a
    sentence-transformers checkpoint on the hub: a ``BertModel`` (safetensors) with random
    weights, a WordPiece tokenizer (``vocab.txt`` and ``tokenizer.json``), the
    sentence-transformers module files with ``pooling`` ("mean", "cls" or "max") and an
    optional Normalize module, and a model card. Loads with ``SentenceTransformer(path)``.
    Returns ``path``.
    """
    import torch
    import transformers

    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; known: {', '.join(POOLINGS)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = wordpiece_tokenizer(path)
    config = transformers.BertConfig(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=512,
        type_vocab_size=2, pad_token_id=0, architectures=["BertModel"])
    torch.manual_seed(seed)
    model = transformers.BertModel(config)
    model = _perturbed(model, dtype)
    model.save_pretrained(str(path))
    _sentence_transformers_files(path, hidden, pooling, normalize)
    return path


def tiny_encoder(**kwargs: Any) -> Path:
    """A cached tiny sentence-embedding model (:func:`make_tiny_encoder`'s arguments),
    built once per argument set under the convcore cache dir."""
    import transformers

    key = json.dumps({"arch": "bert-encoder", "transformers": transformers.__version__,
                      "corpus": CORPUS.stat().st_size, "v": 1, **kwargs}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = cache_dir() / "tiny-models" / f"encoder-{digest}"
    if not (path / "config.json").exists():
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        make_tiny_encoder(tmp, **kwargs)
        try:
            tmp.rename(path)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return path


# image-text checkpoints ------------------------------------------------------------------
# family -> (config class, model class, text model_type, vision config, tokenizer family)
IMAGE_TEXT: dict[str, tuple[str, str, str, dict[str, Any], str]] = {
    "gemma3": ("Gemma3Config", "Gemma3ForConditionalGeneration", "gemma3_text",
               {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                "num_attention_heads": 2, "image_size": 28, "patch_size": 14}, "gemma"),
    "mistral3": ("Mistral3Config", "Mistral3ForConditionalGeneration", "mistral",
                 {"model_type": "pixtral", "hidden_size": 64, "intermediate_size": 128,
                  "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 32,
                  "image_size": 28, "patch_size": 14}, "llama"),
    "llava": ("LlavaConfig", "LlavaForConditionalGeneration", "llama",
              {"model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28,
               "patch_size": 14}, "llama"),
}


def make_tiny_image_text(path: str | os.PathLike, family: str = "gemma3", *, hidden: int = 256,
                         layers: int = 2, heads: int = 4, kv_heads: int = 2, ffn: int = 512,
                         seed: int = 0, **text_overrides: Any) -> Path:
    """A tiny ``*ForConditionalGeneration`` checkpoint (Gemma-3, Mistral-3 or LLaVA
    layout: vision tower, projector, language model in ``text_config``) with random
    weights and the text family's real tokenizer, saved as transformers saves it."""
    import torch
    import transformers

    config_cls, model_cls, text_type, vision, tok_family = IMAGE_TEXT[family]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path, tok_family)
    text = dict(model_type=text_type, vocab_size=len(tok), hidden_size=hidden, intermediate_size=ffn,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                head_dim=hidden // heads, max_position_embeddings=512, rms_norm_eps=1e-6,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **text_overrides)
    if text_type == "gemma3_text":
        text.update(sliding_window=64, query_pre_attn_scalar=64)
    extra = {"mm_tokens_per_image": 4} if family == "gemma3" else {}
    config = getattr(transformers, config_cls)(text_config=text, vision_config=dict(vision), **extra)
    torch.manual_seed(seed)
    model = _perturbed(getattr(transformers, model_cls)(config), "f32")
    model.save_pretrained(str(path))
    return path


def tiny_image_text(family: str = "gemma3", **kwargs: Any) -> Path:
    """A cached :func:`make_tiny_image_text` checkpoint."""
    import transformers

    key = json.dumps({"arch": f"image-text-{family}", "transformers": transformers.__version__,
                      "corpus": CORPUS.stat().st_size, "v": 1, "tokenizer_build": BUILD_VERSION,
                      **kwargs}, sort_keys=True)
    return _cached(f"{family}-it-{hashlib.sha256(key.encode()).hexdigest()[:16]}",
                   lambda tmp: make_tiny_image_text(tmp, family, **kwargs))
