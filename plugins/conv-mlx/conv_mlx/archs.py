"""What mlx-lm's model class for each architecture does with HF tensors: conv-mlx's
unit of extension.

mlx-lm serves many more architectures than the table below; a package that needs one
registers an :class:`ArchRules` for it through the ``conv_mlx_register_archs`` hook
(:mod:`conv_mlx.hookspecs`). conv-mlx registers its own the same way.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from convcore import ConvcoreError, Registrations, collect_registrations

NORMS = ("input_layernorm", "post_attention_layernorm")
HOOK = "conv_mlx_register_archs"


@dataclass(frozen=True)
class ArchRules:
    """How mlx-lm's model class for an architecture treats HF tensors.

    :param model_type: the HF ``model_type`` (mlx-lm picks its model module by it).
    :param tie_default: ``tie_word_embeddings`` when config.json leaves it out (mlx-lm's
        ModelArgs default; None: the key is required).
    :param lm_head: ``"if_untied"`` keeps ``lm_head.weight`` unless embeddings are tied,
        ``"never"`` always drops it (the model reuses the embedding), ``"if_present"``
        keeps whatever the checkpoint has.
    :param norms: the per-layer norms in the order the model class declares them (the
        order mlx-lm writes them in).
    """

    model_type: str
    tie_default: bool | None
    lm_head: str = "if_untied"
    norms: tuple[str, ...] = NORMS

    def alias(self, model_type: str) -> "ArchRules":
        """The same rules under another HF ``model_type``."""
        return dataclasses.replace(self, model_type=model_type)


# mlx_lm/models/<arch>.py as of mlx-lm 0.32 (mistral is served by llama.py).
BUILTIN_ARCHS: Mapping[str, ArchRules] = MappingProxyType({r.model_type: r for r in (
    ArchRules("llama", tie_default=True),
    ArchRules("mistral", tie_default=True),
    ArchRules("qwen2", tie_default=True),
    ArchRules("qwen3", tie_default=None),
    ArchRules("gemma", tie_default=True, lm_head="never"),
    ArchRules("gemma2", tie_default=True, lm_head="never",
              norms=("input_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_attention_layernorm")),
    ArchRules("gemma3_text", tie_default=True, lm_head="if_present",
              norms=NORMS + ("pre_feedforward_layernorm", "post_feedforward_layernorm")),
    ArchRules("phi3", tie_default=False),
)})


def registered(registry: Any = None) -> Registrations:
    """Every registered :class:`ArchRules` by model_type, with the plugin behind each, in
    ``registry`` (default: the one in use)."""
    return collect_registrations(HOOK, lambda r: r.model_type, "mlx architecture for model_type",
                                 kind=ArchRules, registry=registry)


def rules_for(arch: str, registry: Any = None) -> ArchRules:
    """The rules for HF model_type ``arch``, or a one-line error listing the known ones."""
    known = registered(registry).items
    if arch not in known:
        raise ConvcoreError(f"mlx writer: architecture {arch!r} is not supported "
                            f"(supported: {', '.join(known)})")
    return known[arch]
