"""What mlx-lm's model class for each architecture does with HF tensors: conv-mlx's
unit of extension.

mlx-lm serves many more architectures than the table below; a package that needs one
registers an :class:`ArchRules` for it through the ``conv_mlx_register_archs`` hook
(:mod:`conv_mlx.hookspecs`). conv-mlx registers its own the same way.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
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
    :param experts: HF module path of one expert's projection (``{bid}`` the layer,
        ``{xid}`` the expert) -> the module mlx-lm's ``sanitize()`` stacks a layer's
        experts into (``switch_mlp``: weights ``(experts, out, in)``).
    :param module_quant: module-name suffix -> (bits, group) the model class's own
        ``quant_predicate`` gives it whatever the default (Qwen3-MoE's router: 8 bits).
    """

    model_type: str
    tie_default: bool | None
    lm_head: str = "if_untied"
    norms: tuple[str, ...] = NORMS
    experts: dict[str, str] = field(default_factory=dict)
    module_quant: dict[str, tuple[int, int]] = field(default_factory=dict)

    def alias(self, model_type: str) -> "ArchRules":
        """The same rules under another HF ``model_type``."""
        return dataclasses.replace(self, model_type=model_type)


MIXTRAL_EXPERTS = {
    "model.layers.{bid}.block_sparse_moe.experts.{xid}.w1": "model.layers.{bid}.block_sparse_moe.switch_mlp.gate_proj",
    "model.layers.{bid}.block_sparse_moe.experts.{xid}.w2": "model.layers.{bid}.block_sparse_moe.switch_mlp.down_proj",
    "model.layers.{bid}.block_sparse_moe.experts.{xid}.w3": "model.layers.{bid}.block_sparse_moe.switch_mlp.up_proj",
}
QWEN_EXPERTS = {
    f"model.layers.{{bid}}.mlp.experts.{{xid}}.{p}": f"model.layers.{{bid}}.mlp.switch_mlp.{p}"
    for p in ("gate_proj", "up_proj", "down_proj")
}


def expert_of(rules: ArchRules, hf_name: str) -> tuple[str, int] | None:
    """(mlx name of the stacked weight, expert number) of one expert's HF weight, or None."""
    for hf, mlx in rules.experts.items():
        pattern = re.escape(hf).replace(r"\{bid\}", r"(?P<bid>\d+)").replace(r"\{xid\}", r"(?P<xid>\d+)")
        m = re.fullmatch(pattern + r"\.weight", hf_name)
        if m:
            return mlx.replace("{bid}", m.group("bid")) + ".weight", int(m.group("xid"))
    return None


def experts_of(rules: ArchRules, mlx_name: str, n_expert: int) -> list[str] | None:
    """The HF weight names of the experts stacked in mlx tensor ``mlx_name`` (a
    ``.weight``, ``.scales`` or ``.biases``), in order, or None."""
    for hf, mlx in rules.experts.items():
        m = re.fullmatch(re.escape(mlx).replace(r"\{bid\}", r"(?P<bid>\d+)") + r"\.(?P<part>\w+)", mlx_name)
        if m:
            base = hf.replace("{bid}", m.group("bid"))
            return [f"{base.replace('{xid}', str(x))}.{m.group('part')}" for x in range(n_expert)]
    return None


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
    ArchRules("olmo2", tie_default=True,
              norms=("post_attention_layernorm", "post_feedforward_layernorm")),
    ArchRules("granite", tie_default=True),
    ArchRules("smollm3", tie_default=True),
    ArchRules("starcoder2", tie_default=True),
    ArchRules("phi", tie_default=False, lm_head="if_present", norms=("input_layernorm",)),
    ArchRules("mixtral", tie_default=False, experts=MIXTRAL_EXPERTS),
    ArchRules("qwen2_moe", tie_default=False, experts=QWEN_EXPERTS),
    ArchRules("qwen3_moe", tie_default=False, experts=QWEN_EXPERTS,
              module_quant={"mlp.gate": (8, 64)}),
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
