"""The mlx format's runtime: mlx-lm (the ``[infer]`` extra), loaded once, with its
prompt cache."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from convcore import ConvcoreError, Session, first_line




class MlxSession(Session):
    """An MLX directory loaded with ``mlx_lm.load``; logits in float32."""

    def __init__(self, path: Path, options: dict[str, Any]):
        try:
            import mlx.core as mx
            from mlx_lm import load
            from mlx_lm.models.cache import make_prompt_cache
        except ImportError:
            raise ConvcoreError("mlx inference needs mlx and mlx-lm "
                                "(pip install 'conv-mlx[infer]')") from None
        self._mx, self._make_cache = mx, make_prompt_cache
        self.path = path
        loras = list(options.get("lora") or ())
        if len(loras) > 1 or any(float(scale) != 1.0 for _, scale in loras):
            raise ConvcoreError(f"{path}: mlx-lm applies one LoRA adapter at its own scale; merge the others "
                                "(convcore run BASE --lora ADAPTER:SCALE)")
        adapter = str(loras[0][0]) if loras else None
        try:
            self.model, tokenizer = load(str(path), adapter_path=adapter)
        except (ValueError, FileNotFoundError, KeyError) as exc:
            raise ConvcoreError(f"{path}: mlx-lm cannot load it: {first_line(exc)}") from None
        self.lora_applied = bool(loras)
        args = getattr(self.model, "args", None)
        self.vocab_size = int(getattr(args, "vocab_size", 0) or 0)
        self.stop_ids = tuple(sorted(int(t) for t in getattr(tokenizer, "eos_token_ids", ()) or ()))
        self._cache: Any = None

    def _forward(self, ids: list[int]) -> np.ndarray:
        mx = self._mx
        try:
            out = self.model(mx.array([ids]), cache=self._cache)[0].astype(mx.float32)
            mx.eval(out)
        except (IndexError, ValueError, RuntimeError) as exc:  # mlx-lm's own limits
            raise ConvcoreError(f"{self.path}: mlx-lm forward pass failed: "
                                f"{type(exc).__name__}: {first_line(exc)}") from None
        return np.array(out, dtype=np.float32)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = self.check_ids(token_ids)
        self._cache = self._make_cache(self.model)
        return self._forward(ids)

    def decode(self, token_ids: Sequence[int]) -> np.ndarray:
        if self._cache is None:
            raise ConvcoreError("decode() before logits(): nothing to continue")
        return self._forward(self.check_ids(token_ids))

    def close(self) -> None:
        self._cache = None
        self.model = None
