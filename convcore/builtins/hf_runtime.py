"""The hf format's runtime: transformers (torch), loaded once, with its KV cache."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..model import ConvcoreError
from ..runtime import Session


class TransformersSession(Session):
    """An HF directory loaded with ``AutoModelForCausalLM`` in float32 on the CPU."""

    def __init__(self, path: Path, options: dict[str, Any]):
        try:
            import torch
            from transformers import AutoModelForCausalLM
        except ImportError:
            raise ConvcoreError("hf inference needs transformers and torch "
                                "(pip install 'convcore[torch]')") from None
        self._torch = torch
        if not options.get("verbose"):
            # transformers draws a weight-loading bar on stderr; runtimes stay quiet
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
        if options.get("threads"):
            torch.set_num_threads(int(options["threads"]))
        try:
            self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        except (OSError, ValueError, KeyError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConvcoreError(f"{path}: transformers cannot load it ({first})") from None
        self.model.eval()
        self.vocab_size = int(self.model.config.get_text_config().vocab_size)
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = getattr(self.model.config, "eos_token_id", None)
        self.stop_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])
                              if e is not None)
        self._cache: Any = None
        # transformers renamed ``past_key_values`` to ``cache`` during 5.x
        params = inspect.signature(self.model.forward).parameters
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
