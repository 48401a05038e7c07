"""convcore plugin ``mlx``: Hugging Face <-> MLX directories that ``mlx_lm.load`` reads.

Writes what ``mlx_lm.convert`` writes (same tensors, bytes, config quantization blocks,
``{"format": "mlx"}`` safetensors metadata, always an index, 5 GiB shards), quantizing
through the core's ``int{B}-g{G}`` affine schemes. Reads MLX dirs back with HF names and
lazily dequantized weights. Validates config against weights; infers with mlx-lm.

Writer options (``-O KEY=VALUE``): ``quant_overrides`` (``"lm_head:int8-g64,embed_tokens:f16"``:
per-module schemes, recorded per module in config.json), ``embed_bits`` / ``lm_head_bits``
(keep embeddings / lm_head at more bits), ``quant_recipe`` (mlx-lm's ``mixed_2_6``,
``mixed_3_4``, ``mixed_3_6``, ``mixed_4_6``), ``split_max_size`` (shard size in bytes).

Other packages add architectures through the hook ``conv_mlx_register_archs``
(:mod:`conv_mlx.hookspecs`) with :class:`ArchRules`; the built-in ones in
:data:`BUILTIN_ARCHS` are registered the same way.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np
import convcore
from convcore import ConvcoreError, Format, Model, Option, hookimpl

from .archs import BUILTIN_ARCHS, ArchRules
from .layout import RECIPES, SCHEMES, SHARD_BYTES
from .reader import load_mlx
from .validate import validate_mlx
from .writer import write_mlx

__all__ = ["ArchRules", "BUILTIN_ARCHS", "detect", "load_mlx", "validate_mlx", "write_mlx"]


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


# the writer's options (-O KEY=VALUE, --split-max-size, --dry-run)
OPTIONS = (
    Option("split_max_size", "size", SHARD_BYTES, "largest safetensors shard (mlx-lm: 5 GiB)"),
    Option("quant_overrides", "str", None,
           "per-module schemes, e.g. lm_head:int8-g64,embed_tokens:f16"),
    Option("embed_bits", "int", None, "bits for the embedding (its group: --quant's)"),
    Option("lm_head_bits", "int", None, "bits for lm_head (its group: --quant's)"),
    Option("quant_recipe", "choice", None, "one of mlx-lm's mixed recipes", choices=tuple(RECIPES)),
    Option("dry_run", "bool", False, "print each tensor's name, type and shape; write nothing"),
)


@hookimpl
def convcore_register_formats(register: Callable[..., None]) -> None:
    register(Format(name="mlx", description="MLX / mlx-lm model directory (affine int2-int8 groups)",
                    directory=True, schemes=SCHEMES, detect=detect,
                    outputs=("config.json", "model.safetensors", "model-*-of-*.safetensors",
                             "model.safetensors.index.json"), options=OPTIONS,
                    scheme_package="quant-rowwise", architectures=architectures, adapters=True))


#: the architectures conv-mlx's own tests run in mlx-lm against transformers
CHECKED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
           "mixtral", "qwen2_moe", "qwen3_moe", "olmo2", "granite", "smollm3", "starcoder2", "phi")


def architectures() -> dict[str, dict[str, Any]]:
    """Every registered architecture (conv-mlx's and other plugins'), as Format declares."""
    from .archs import registered
    return {mt: {"write": True, "read": True, "checked": mt in CHECKED, "note": ""}
            for mt in registered().items}


@hookimpl
def convcore_add_hookspecs(pluginmanager: Any) -> None:
    from . import hookspecs
    pluginmanager.add_hookspecs(hookspecs)


@hookimpl
def conv_mlx_register_archs(register: Callable[..., None]) -> None:
    for rules in BUILTIN_ARCHS.values():
        register(rules)


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
    if convcore.adapter_info(model) is not None:
        from .adapter import write_adapter
        return write_adapter(model, Path(path), options, progress)
    return write_mlx(convcore.text_model(model, "mlx-lm"), Path(path), options, progress)


@hookimpl
def convcore_validate(path: Path, fmt: str) -> list[str] | None:
    if fmt != "mlx":
        return None
    if (Path(path) / "adapters.safetensors").is_file():
        from .adapter import validate_adapter
        return validate_adapter(Path(path))
    return validate_mlx(Path(path))


@hookimpl
def convcore_open_session(path: Path, fmt: str, options: dict[str, Any]) -> Any:
    if fmt != "mlx":
        return None
    from .runtime import MlxSession
    return MlxSession(Path(path), options)
