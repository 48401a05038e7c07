"""The config keys mlx-lm reads for rope and per-layer attention, whatever transformers
version wrote the source.

transformers 5 saves rope settings only as ``rope_parameters``; mlx-lm's model classes
read ``rope_theta`` and ``rope_scaling`` (and Gemma-3's ``rope_local_base_freq`` and
``sliding_window_pattern``) and fall back to their own defaults when those are missing:
a model converted without them loads and computes something else. So every config this
writer saves carries them, derived as transformers derives them; a setting mlx-lm cannot
express is refused.
"""
from __future__ import annotations

import math
from typing import Any

from convcore import ConvcoreError, hfconfig

#: rope types mlx-lm's ``initialize_rope`` builds as transformers computes them
SUPPORTED = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
_DROP = ("rope_theta", "partial_rotary_factor")


def mlx_keys(config: dict[str, Any], arch: str, source: str = "model") -> dict[str, Any]:
    """The keys to set in the config.json mlx-lm reads (on top of the HF config)."""
    p = hfconfig.rope_parameters(config, "full_attention", arch)
    kind = p["rope_type"]
    if kind not in SUPPORTED:
        raise ConvcoreError(f"{source}: rope type {kind!r} is not built by mlx-lm "
                            f"(it takes: {', '.join(SUPPORTED)})")
    out: dict[str, Any] = {"rope_theta": p["rope_theta"]}
    scaling = {k: v for k, v in p.items() if k not in _DROP}
    if kind == "yarn":
        factor = float(p.get("factor", 1.0))
        default_mscale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        given = p.get("attention_factor")
        if given is not None and not math.isclose(float(given), default_mscale, rel_tol=1e-6):
            if factor <= 1:
                raise ConvcoreError(f"{source}: yarn attention_factor {given} with factor {factor:g} is "
                                    "not expressible for mlx-lm (it scales only when factor > 1)")
            # mlx-lm scales by (0.1 mscale ln f + 1) / (0.1 mscale_all_dim ln f + 1)
            scaling["mscale"] = (float(given) - 1.0) / (0.1 * math.log(factor))
            scaling["mscale_all_dim"] = 0.0
        if p.get("truncate") is False:
            raise ConvcoreError(f"{source}: yarn rope with truncate=false is not built by mlx-lm")
        if p.get("original_max_position_embeddings") is None and config.get("max_position_embeddings"):
            # transformers' default; mlx-lm's own would be 4096
            scaling["original_max_position_embeddings"] = int(config["max_position_embeddings"])
        scaling.pop("attention_factor", None)
    if kind != "default":
        # "type" too: mlx-lm's phi3 insists on the v4 key
        out["rope_scaling"] = {**scaling, "type": kind}
    if kind == "longrope" and p.get("original_max_position_embeddings"):
        # mlx-lm's phi3 reads the original context at the top level (default 4096)
        out["original_max_position_embeddings"] = int(p["original_max_position_embeddings"])
    elif config.get("rope_scaling") is not None:
        out["rope_scaling"] = None
    if p.get("partial_rotary_factor", 1.0) != 1.0 and config.get("partial_rotary_factor") is None:
        out["partial_rotary_factor"] = p["partial_rotary_factor"]
    if arch.startswith("gemma3"):
        local = hfconfig.rope_parameters(config, "sliding_attention", arch)
        if local["rope_type"] != "default":
            raise ConvcoreError(f"{source}: the sliding layers' rope type {local['rope_type']!r} is "
                                "not built by mlx-lm's gemma3 (default rope only)")
        out["rope_local_base_freq"] = local["rope_theta"]
        types = hfconfig.layer_types(config, arch)
        said = int(config.get("sliding_window_pattern") or 6)
        pattern = said if hfconfig.sliding_pattern(types, said) else hfconfig.sliding_pattern(types)
        if pattern is None:
            raise ConvcoreError(f"{source}: layer_types {types} are not every n-th layer global, "
                                "the only layout mlx-lm's gemma3 runs")
        out["sliding_window_pattern"] = pattern
    return out
