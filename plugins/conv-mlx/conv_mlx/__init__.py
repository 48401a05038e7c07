"""convcore plugin ``mlx``: Hugging Face <-> MLX directories that ``mlx_lm.load`` reads.

Writes what ``mlx_lm.convert`` writes (same tensors, bytes, config quantization blocks,
``{"format": "mlx"}`` safetensors metadata, always an index, 5 GiB shards), quantizing
through the core's ``int{B}-g{G}`` affine schemes. Reads MLX dirs back with HF names and
lazily dequantized weights. Validates config against weights; infers with mlx-lm.

Writer options (``-O KEY=VALUE``): ``quant_overrides`` (``"lm_head:int8-g64,embed_tokens:f16"``:
per-module schemes, recorded per module in config.json), ``embed_bits`` / ``lm_head_bits``
(keep embeddings / lm_head at more bits), ``quant_recipe`` (mlx-lm's ``mixed_2_6``,
``mixed_3_4``, ``mixed_3_6``, ``mixed_4_6``), ``split_max_size`` (shard size in bytes).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np
from convcore import ConvcoreError, Format, Model, hookimpl

from .layout import SCHEMES
from .reader import load_mlx
from .validate import validate_mlx
from .writer import write_mlx

__all__ = ["detect", "load_mlx", "validate_mlx", "write_mlx"]


def _safetensors_format(file: Path) -> str:
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100 * 1024 * 1024:
            return ""
        header = json.loads(f.read(n))
    return str((header.get("__metadata__") or {}).get("format", ""))


def detect(path: Path) -> int:
    """20 for a directory whose safetensors say ``{"format": "mlx"}`` or whose config.json
    has a ``quantization`` block (above hf's 10); 0 otherwise."""
    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        return 0
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if isinstance(config, dict) and isinstance(config.get("quantization"), dict):
            return 20
    except (OSError, ValueError):
        return 0
    for file in sorted(path.glob("*.safetensors"))[:1]:
        try:
            if _safetensors_format(file) == "mlx":
                return 20
        except (OSError, ValueError, struct.error):
            return 0
    return 0


@hookimpl
def convcore_register_formats(register: Callable[..., None]) -> None:
    register(Format(name="mlx", description="MLX / mlx-lm model directory (affine int2-int8 groups)",
                    directory=True, schemes=SCHEMES, detect=detect))


@hookimpl
def convcore_load(path: Path, fmt: str, options: dict[str, Any]) -> Model | None:
    if fmt != "mlx":
        return None
    return load_mlx(Path(path))


@hookimpl
def convcore_write(model: Model, path: Path, fmt: str, options: dict[str, Any],
                   progress: Callable[[str], None]) -> Path | None:
    if fmt != "mlx":
        return None
    return write_mlx(model, Path(path), options, progress)


@hookimpl
def convcore_validate(path: Path, fmt: str) -> list[str] | None:
    if fmt != "mlx":
        return None
    return validate_mlx(Path(path))


@hookimpl
def convcore_infer(path: Path, fmt: str, token_ids: list[int]) -> np.ndarray | None:
    if fmt != "mlx":
        return None
    try:
        import mlx.core as mx
        from mlx_lm import load
    except ImportError:
        raise ConvcoreError("mlx inference needs mlx and mlx-lm (pip install 'conv-mlx[infer]')") from None
    try:
        model, _ = load(str(path))
    except (ValueError, FileNotFoundError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConvcoreError(f"{path}: mlx-lm cannot load it: {first}") from None
    try:
        logits = model(mx.array([list(token_ids)]))[0].astype(mx.float32)
        mx.eval(logits)
    except (IndexError, ValueError, RuntimeError) as exc:  # mlx-lm's own limits, e.g. too few layers
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConvcoreError(f"{path}: mlx-lm forward pass failed: {type(exc).__name__}: {first}") from None
    return np.array(logits, dtype=np.float32)
