"""convcore plugin for GGUF, llama.cpp's model file.

Writes HF models as GGUF (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3, phi3, and
BERT sentence-embedding encoders) in every llama.cpp type from f32 to the k-quant mixes,
reads GGUF back into convcore's model (dequantizing on demand), validates files and runs
them with llama-cpp-python (encoders as embedding models).

Other packages add architectures through the hook ``conv_gguf_register_archs``
(:mod:`conv_gguf.hookspecs`) with :class:`Arch` objects; the built-in ones are
registered through the same hook, from :data:`BUILTIN_ARCHS`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

import convcore
from convcore import Model

from . import arch_table, archs, mixes
from .archs import BUILTIN_ARCHS, Arch

__all__ = ["Arch", "BUILTIN_ARCHS", "registered_archs"]

FORMAT = "gguf"


def registered_archs(registry: convcore.Registry | None = None) -> dict[str, Arch]:
    """Every architecture the gguf writer knows (HF model_type -> :class:`Arch`), built-in
    and from other plugins, in the given registry (default: the one in use)."""
    return dict(arch_table.registered(registry).items)


def detect(path: Path) -> int:
    """20 for a file that starts with the GGUF magic."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        return 20 if f.read(4) == b"GGUF" else 0


# the writer's options (-O KEY=VALUE and the --split-max-*, --vocab-only, --dry-run flags)
OPTIONS = (
    convcore.Option("split_max_size", "size", None,
                    "largest shard, e.g. 2G (llama.cpp's --split-max-size)"),
    convcore.Option("split_max_tensors", "int", None, "most tensors per shard"),
    convcore.Option("vocab_only", "bool", False, "write the vocabulary and metadata, no tensors"),
    convcore.Option("dry_run", "bool", False, "print name, shape and type of every tensor; write nothing"),
    convcore.Option("pure", "bool", False,
                    "llama-quantize's --pure: every weight in the file type's block type"),
    convcore.Option("imatrix", "str", None,
                    "importance matrix guiding the quantized types (llama.cpp's GGUF imatrix "
                    "or .dat; `convcore imatrix` makes one)"),
)


@convcore.hookimpl
def convcore_register_formats(register: Callable[..., None]) -> None:
    register(convcore.Format(
        name=FORMAT, description="GGUF, llama.cpp's single-file model (split files too)",
        directory=False, extensions=(".gguf",), schemes=mixes.SCHEMES, detect=detect,
        options=OPTIONS, scheme_package="quant-rowwise", architectures=architectures, adapters=True))


#: the architectures conv-gguf's own tests run in llama.cpp against transformers
CHECKED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "bert",
           "mixtral", "qwen2_moe", "qwen3_moe", "olmo2", "granite", "smollm3", "starcoder2", "phi")


def architectures() -> dict[str, dict[str, Any]]:
    """Every registered architecture (conv-gguf's and other plugins'), as Format declares."""
    from .arch_table import registered
    return {mt: {"write": True, "read": True, "checked": mt in CHECKED,
                 "note": "" if a.gguf_arch == mt else f"as {a.gguf_arch}"}
            for mt, a in registered().items.items()}


@convcore.hookimpl
def convcore_add_hookspecs(pluginmanager: Any) -> None:
    from . import hookspecs
    pluginmanager.add_hookspecs(hookspecs)


@convcore.hookimpl
def conv_gguf_register_archs(register: Callable[..., None]) -> None:
    for arch in BUILTIN_ARCHS.values():
        register(arch)


@convcore.hookimpl
def convcore_map_names(model: Model, target: str) -> dict[str, str] | None:
    if target != FORMAT:
        return None
    spec = arch_table.registered().items.get(model.arch)
    if spec is None:
        return None
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
    if convcore.adapter_info(model) is not None:
        from .adapter import write_adapter
        return write_adapter(model, Path(path), options, progress)
    from .writer import write_gguf
    return write_gguf(convcore.text_model(model, "llama.cpp"), Path(path), options, progress)


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
def convcore_open_session(path: Path, fmt: str, options: dict[str, Any]) -> Any:
    if fmt != FORMAT:
        return None
    from .runtime import LlamaCppSession
    return LlamaCppSession(Path(path), options)


@convcore.hookimpl
def convcore_register_commands(cli: Any) -> None:
    from .commands import imatrix
    cli.add_command(imatrix)
