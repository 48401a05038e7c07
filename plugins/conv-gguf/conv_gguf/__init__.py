"""convcore plugin for GGUF, llama.cpp's model file.

Writes HF models as GGUF (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3, phi3)
in every llama.cpp type from f32 to the k-quant mixes, reads GGUF back into convcore's
model (dequantizing on demand), validates files and runs them with llama-cpp-python.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

import convcore
from convcore import Model

from . import archs, mixes

FORMAT = "gguf"


def detect(path: Path) -> int:
    """20 for a file that starts with the GGUF magic."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        return 20 if f.read(4) == b"GGUF" else 0


@convcore.hookimpl
def convcore_register_formats(register: Callable[..., None]) -> None:
    register(convcore.Format(
        name=FORMAT, description="GGUF, llama.cpp's single-file model (split files too)",
        directory=False, extensions=(".gguf",), schemes=mixes.SCHEMES, detect=detect))


@convcore.hookimpl
def convcore_map_names(model: Model, target: str) -> dict[str, str] | None:
    if target != FORMAT or model.arch not in archs.ARCHS:
        return None
    spec = archs.ARCHS[model.arch]
    out = {}
    for name in model.tensors:
        mapped = archs.map_name(spec, name)
        if mapped is not None:
            out[name] = mapped
    return out


@convcore.hookimpl
def convcore_write(model: Model, path: Path, fmt: str, options: dict[str, Any],
                   progress: Callable[[str], None]) -> Path | None:
    if fmt != FORMAT:
        return None
    from .writer import write_gguf
    return write_gguf(model, Path(path), options, progress)


@convcore.hookimpl
def convcore_load(path: Path, fmt: str, options: dict[str, Any]) -> Model | None:
    if fmt != FORMAT:
        return None
    from .reader import load_gguf
    return load_gguf(Path(path))


@convcore.hookimpl
def convcore_validate(path: Path, fmt: str) -> list[str] | None:
    if fmt != FORMAT:
        return None
    from .checks import validate
    return validate(Path(path))


@convcore.hookimpl
def convcore_infer(path: Path, fmt: str, token_ids: list[int]) -> np.ndarray | None:
    if fmt != FORMAT:
        return None
    from .runtime import logits
    return logits(Path(path), token_ids)
