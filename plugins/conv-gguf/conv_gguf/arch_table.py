"""The architectures in use: what every plugin passed to ``conv_gguf_register_archs``.

Looked up in the registry of the running conversion (``convcore.get_registry()``), so
a plugin's architecture counts wherever that plugin is loaded and nowhere else.
"""
from __future__ import annotations

from typing import Any

from convcore import ConvcoreError, Registrations, collect_registrations

from .archs import Arch

HOOK = "conv_gguf_register_archs"


def registered(registry: Any = None) -> Registrations:
    """Every registered :class:`Arch` by HF model_type, with the plugin that registered it."""
    return collect_registrations(HOOK, lambda a: a.model_type, "gguf architecture for model_type",
                                 kind=Arch, registry=registry)


def arch_for(model_type: str, source: str = "", registry: Any = None) -> Arch:
    """The entry for an HF model_type, or a one-line error listing what is known."""
    archs = registered(registry).items
    if model_type not in archs:
        raise ConvcoreError(
            f"{source or 'model'}: architecture {model_type!r} is not supported by the gguf "
            f"writer (supported: {', '.join(archs)})")
    return archs[model_type]


def read_back(registry: Any = None) -> dict[str, Arch]:
    """GGUF architecture -> the entry its files read back as (one per GGUF architecture)."""
    found = registered(registry)
    out: dict[str, Arch] = {}
    for arch in found.items.values():
        if not arch.read_back:
            continue
        if arch.gguf_arch in out:
            first = out[arch.gguf_arch]
            raise ConvcoreError(
                f"GGUF architecture {arch.gguf_arch!r} would read back as both "
                f"{first.model_type!r} (plugin {found.plugins[first.model_type]!r}) and "
                f"{arch.model_type!r} (plugin {found.plugins[arch.model_type]!r}); register "
                "one of them with Arch.alias()")
        out[arch.gguf_arch] = arch
    return out
