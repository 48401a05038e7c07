"""Built-in formats ``peft`` and ``mlx-adapter``: LoRA adapter folders (read only).

An adapter is read over its base model (``--base``, else the base its config names when
that is a local folder), which gives the architecture, the tensor names and the shapes
every matrix is checked against. ``convcore run ADAPTER --to gguf`` / ``--to mlx`` writes
the runtime's adapter file; ``convcore run BASE --lora ADAPTER`` merges it instead.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..hookspecs import hookimpl
from ..hub import resolve
from ..lora import base_for, detect_mlx_adapter, detect_peft, read_mlx_adapter, read_peft
from ..model import ConvcoreError, Model
from ..registry import Format, get_registry

READERS = {"peft": read_peft, "mlx-adapter": read_mlx_adapter}


@hookimpl
def convcore_register_formats(register: Callable[..., None]) -> None:
    register(Format(name="peft", description="PEFT LoRA adapter folder (read over --base)",
                    directory=True, can_write=False, detect=detect_peft))
    register(Format(name="mlx-adapter", description="mlx-lm LoRA adapter folder (read over --base)",
                    directory=True, can_write=False, detect=detect_mlx_adapter))


def load_adapter(path: Path, base: Model) -> Model:
    """The adapter at ``path`` (either kind, detected) over the loaded ``base``."""
    path = resolve(path)   # a hub id: its local snapshot
    if not path.exists():
        raise ConvcoreError(f"{path}: no such file or directory (a --lora adapter)")
    if detect_mlx_adapter(path):
        return read_mlx_adapter(path, base)
    if detect_peft(path) or (path / "adapter_config.json").is_file():
        return read_peft(path, base)
    raise ConvcoreError(f"{path}: not a LoRA adapter (no adapter_config.json)")


@hookimpl
def convcore_load(path: Path, fmt: str, options: dict[str, Any]) -> Model | None:
    if fmt not in READERS:
        return None
    base_path = base_for(path, options.get("base"))
    registry = get_registry()
    if registry.detect(base_path) in READERS:
        raise ConvcoreError(f"{base_path}: is an adapter, not a base model (--base)")
    base = registry.load(base_path)
    return READERS[fmt](path, base)
