"""The hf format's runtime: transformers (torch), loaded once, with its KV cache."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..model import ConvcoreError
from ..runtime import Session


def _load(path: Path, options: dict[str, Any], auto_class: str) -> tuple[Any, Any]:
    """(torch, the model) loaded with ``transformers.<auto_class>`` in float32; a model
    whose weights transformers had to invent (a head the checkpoint lacks) is refused,
    so no runtime ever runs newly initialised weights."""
    try:
        import torch
        import transformers
    except ImportError:
        raise ConvcoreError("hf inference needs transformers and torch "
                            "(pip install 'convcore[torch]')") from None
    if not options.get("verbose"):
        # transformers draws a weight-loading bar on stderr; runtimes stay quiet
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()  # its load report (unused head weights, ...)
    if options.get("threads"):
        torch.set_num_threads(int(options["threads"]))
    try:
        model, info = getattr(transformers, auto_class).from_pretrained(
            str(path), dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConvcoreError(f"{path}: transformers cannot load it ({first})") from None
    # rotary tables are computed, and an encoder's pooler is never used here (sentence
    # embeddings pool the last hidden states): neither counts as invented weights
    missing = [n for n in info.get("missing_keys", []) if "rotary" not in n
               and not (auto_class == "AutoModel" and n.split(".")[0] == "pooler")]
    if missing:
        raise ConvcoreError(f"{path}: {auto_class} would run newly initialised weights "
                            f"({', '.join(sorted(missing)[:3])}); the checkpoint lacks them")
    return torch, model.eval()


def _with_adapters(model: Any, loras: list[tuple[Any, float]]) -> Any:
    """``model`` running PEFT LoRA adapters (applied, not merged), each at its scale."""
    try:
        import peft
    except ImportError:
        raise ConvcoreError("--lora in transformers needs peft (pip install 'convcore[lora]')") from None
    names = []
    for i, (adapter, scale) in enumerate(loras):
        name = f"adapter{i}"
        try:
            if i == 0:
                model = peft.PeftModel.from_pretrained(model, str(adapter), adapter_name=name)
            else:
                model.load_adapter(str(adapter), adapter_name=name)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConvcoreError(f"{adapter}: peft cannot apply it ({first})") from None
        for module in model.modules():
            scaling = getattr(module, "scaling", None)
            if isinstance(scaling, dict) and name in scaling:
                scaling[name] *= float(scale)
        names.append(name)
    model.base_model.set_adapter(names)
    return model.eval()


class TransformersSession(Session):
    """An HF directory loaded with ``AutoModelForCausalLM`` in float32 on the CPU."""

    def __init__(self, path: Path, options: dict[str, Any]):
        self._torch, self.model = _load(path, options, "AutoModelForCausalLM")
        if options.get("lora"):
            self.model = _with_adapters(self.model, options["lora"])
            self.lora_applied = True
        self.vocab_size = int(self.model.config.get_text_config().vocab_size)
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = getattr(self.model.config, "eos_token_id", None)
        self.stop_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])
                              if e is not None)
        self._cache: Any = None
        # transformers renamed ``past_key_values`` to ``cache`` during 5.x
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        params = inspect.signature(base.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def _forward(self, ids: list[int], cache: Any) -> np.ndarray:
        torch = self._torch
        with torch.no_grad():
            out = self.model(torch.tensor([ids], dtype=torch.long), use_cache=True,
                             **{self._cache_arg: cache})
        cache = getattr(out, "cache", None)
        self._cache = cache if cache is not None else getattr(out, "past_key_values", None)
        return out.logits[0].float().numpy()

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        return self._forward(self.check_ids(token_ids), None)

    def decode(self, token_ids: Sequence[int]) -> np.ndarray:
        if self._cache is None:
            raise ConvcoreError("decode() before logits(): nothing to continue")
        return self._forward(self.check_ids(token_ids), self._cache)

    def close(self) -> None:
        self._cache = None
        self.model = None


class TransformersEncoderSession(Session):
    """An encoder directory (BERT-style, maybe a sentence-transformers model) loaded with
    ``AutoModel``: the base model only, never a task head; embeddings pooled as its
    sentence-transformers files say."""

    kind = "encoder"

    def __init__(self, path: Path, options: dict[str, Any]):
        from ..pooling import read_pooling
        self._torch, self.model = _load(path, options, "AutoModel")
        self.pooling = read_pooling(path)
        self.vocab_size = int(getattr(self.model.config, "vocab_size", 0) or 0)

    def hidden_states(self, token_ids: Sequence[int]) -> np.ndarray:
        torch = self._torch
        ids = self.check_ids(token_ids)
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([ids], dtype=torch.long),
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        return out.last_hidden_state[0].float().numpy()

    def embed(self, token_ids: Sequence[int]) -> np.ndarray:
        from ..pooling import pool
        return pool(self.hidden_states(token_ids), self.pooling)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        raise ConvcoreError("this model is an encoder (embedding model): it has no next-token logits")

    def close(self) -> None:
        self.model = None
