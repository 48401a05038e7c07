"""What an MLX directory holds, as data: tensor order and the tensors mlx-lm drops (by
the per-architecture rules in :mod:`conv_mlx.archs`), affine scheme names, packed shapes,
and the per-module quantization choices mlx-lm records.

mlx-lm keeps Hugging Face tensor names for the llama family; its ``sanitize()`` only
drops tensors (precomputed rotary frequencies, a tied ``lm_head``), so the reader has
nothing to rename back.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Any

from convcore import ConvcoreError

from .archs import ArchRules

GROUP_SIZES = (32, 64, 128)
BITS = (2, 3, 4, 5, 6, 8)
SCHEMES = tuple(f"int{b}-g{g}" for b in BITS for g in GROUP_SIZES)
_SCHEME_RE = re.compile(r"^int(\d+)-g(\d+)$")
SHARD_BYTES = 5 << 30  # mlx-lm's MAX_FILE_SIZE_GB = 5, counted in GiB
TORCH_DTYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


# The order mlx-lm's modules declare their parameters (tree_flatten(model.parameters())),
# which is the order it fills shards in.
ATTN_ORDER = ("q_proj", "qkv_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")
MLP_ORDER = ("gate_proj", "gate_up_proj", "down_proj", "up_proj")
MOE_ORDER = ("gate", "switch_mlp.gate_proj", "switch_mlp.up_proj", "switch_mlp.down_proj",
             "shared_expert.gate_proj", "shared_expert.down_proj", "shared_expert.up_proj",
             "shared_expert_gate")
PARAM_ORDER = ("weight", "scales", "biases", "bias")
DROPPED_SUFFIXES = ("rotary_emb.inv_freq",)


def dropped(name: str, config: dict[str, Any], rules: ArchRules) -> bool:
    """True for tensors mlx-lm's sanitize() removes."""
    if name.endswith(DROPPED_SUFFIXES):
        return True
    if name == "lm_head.weight":
        if rules.lm_head == "never":
            return True
        if rules.lm_head == "if_untied":
            tied = config.get("tie_word_embeddings", rules.tie_default)
            return bool(tied)
    return False


def _rank(table: tuple[str, ...], part: str) -> int:
    return table.index(part) if part in table else len(table)


def order_key(name: str, rules: ArchRules) -> tuple:
    """Sort key placing ``name`` where mlx-lm's parameter order puts it: embeddings,
    then each layer (attention, MLP, norms), final norm, lm_head; unknown names last."""
    *module, param = name.split(".")
    p = _rank(PARAM_ORDER, param)
    if module[:2] == ["model", "embed_tokens"]:
        return (0, 0, 0, 0, p)
    if module[:2] == ["model", "layers"] and len(module) > 2 and module[2].isdigit():
        rest = module[3:]
        if rest[:1] == ["self_attn"] and len(rest) == 2:
            sub = (0, _rank(ATTN_ORDER, rest[1]))
        elif rest[:1] == ["mlp"] and len(rest) == 2:
            sub = (1, _rank(MLP_ORDER, rest[1]))
        elif rest[:1] in (["mlp"], ["block_sparse_moe"]) and len(rest) >= 2:
            sub = (1, len(MLP_ORDER) + 1 + _rank(MOE_ORDER, ".".join(rest[1:])))
        elif len(rest) == 1 and rest[0] in rules.norms:
            sub = (2, rules.norms.index(rest[0]))
        else:
            sub = (3, 0)
        return (1, int(module[2]), *sub, p)
    if module == ["model", "norm"]:
        return (2, 0, 0, 0, p)
    if module == ["lm_head"]:
        return (3, 0, 0, 0, p)
    return (4, 0, 0, 0, p)


def parse_scheme(scheme: str) -> tuple[int, int]:
    """(bits, group_size) of an ``int{B}-g{G}`` scheme name."""
    m = _SCHEME_RE.match(scheme or "")
    if not m or int(m.group(1)) not in BITS or int(m.group(2)) not in GROUP_SIZES:
        raise ConvcoreError(f"mlx: {scheme!r} is not an affine scheme (expected one of "
                            f"int{{2,3,4,5,6,8}}-g{{32,64,128}})")
    return int(m.group(1)), int(m.group(2))


def scheme_name(bits: int, group_size: int) -> str:
    return f"int{bits}-g{group_size}"


def packed_shapes(shape: tuple[int, ...], bits: int, group_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(weight shape, scales/biases shape) mx.quantize produces for a float ``shape``."""
    *lead, cols = shape
    return (*lead, cols * bits // 32), (*lead, cols // group_size)


def quantizable(name: str, shape: tuple[int, ...], group_size: int) -> bool:
    """mlx-lm quantizes Linear, SwitchLinear (stacked experts, 3-D) and Embedding weights
    whose input width divides by the group; norms and biases stay float."""
    return name.endswith(".weight") and len(shape) in (2, 3) and shape[-1] % group_size == 0


# per-module choices -------------------------------------------------------------------
RECIPES = {"mixed_2_6": (2, 6), "mixed_3_4": (3, 4), "mixed_3_6": (3, 6), "mixed_4_6": (4, 6)}


def recipe_bits(recipe: str, module: str, num_layers: int) -> int:
    """Bits mlx-lm's ``mixed_*`` recipes give ``module`` (its mixed_quant_predicate:
    more bits for v_proj/down_proj in the first and last eighth of the layers and every
    third layer between, and for lm_head)."""
    low, high = RECIPES[recipe]
    parts = module.split(".")
    index = int(parts[2]) if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit() else 0
    more = (index < num_layers // 8 or index >= 7 * num_layers // 8
            or (index - num_layers // 8) % 3 == 2)
    if ("v_proj" in module or "down_proj" in module) and more:
        return high
    if "lm_head" in module:
        return high
    return low


def parse_overrides(value: Any) -> list[tuple[str, str]]:
    """``quant_overrides`` as (pattern, scheme-or-float) pairs, from a dict or from the
    CLI string ``"lm_head:int8-g64,embed_tokens:int6-g64"``."""
    if not value:
        return []
    if isinstance(value, dict):
        pairs = list(value.items())
    else:
        pairs = []
        for item in str(value).split(","):
            if not item.strip():
                continue
            pattern, sep, scheme = item.partition(":")
            if not sep:
                raise ConvcoreError(f"mlx: quant_overrides entry {item!r} is not PATTERN:SCHEME")
            pairs.append((pattern.strip(), scheme.strip()))
    out = []
    for pattern, scheme in pairs:
        if scheme not in ("f32", "f16", "bf16", "none"):
            parse_scheme(scheme)
        out.append((str(pattern), str(scheme)))
    return out


def matches(pattern: str, module: str) -> bool:
    """A module path matches its full path, a trailing part (``embed_tokens``) or a glob."""
    return module == pattern or module.endswith("." + pattern) or fnmatch.fnmatchcase(module, pattern)


def module_choice(module: str, default: tuple[int, int], options: dict[str, Any],
                  num_layers: int) -> tuple[tuple[int, int] | None, bool]:
    """((bits, group) or None for float, recorded-per-module) for one quantizable module.

    Order: ``quant_overrides`` (first matching pattern), then ``embed_bits`` /
    ``lm_head_bits``, then ``quant_recipe``, then the ``--quant`` default."""
    bits, group = default
    for pattern, scheme in parse_overrides(options.get("quant_overrides")):
        if matches(pattern, module):
            if scheme in ("f32", "f16", "bf16", "none"):
                return None, False
            return parse_scheme(scheme), True
    for key, part in (("embed_bits", "embed_tokens"), ("lm_head_bits", "lm_head")):
        if options.get(key) and module.split(".")[-1] == part:
            b = int(options[key])
            if b not in BITS:
                raise ConvcoreError(f"mlx: {key}={b} (expected one of {BITS})")
            return (b, group), True
    recipe = options.get("quant_recipe")
    if recipe:
        if recipe not in RECIPES:
            raise ConvcoreError(f"mlx: unknown quant_recipe {recipe!r} (known: {', '.join(RECIPES)})")
        return (recipe_bits(recipe, module, num_layers), group), True
    return (bits, group), False
