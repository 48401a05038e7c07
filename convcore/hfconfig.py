"""What an HF config.json means when it leaves things implicit, as transformers reads it.

Checkpoints on the Hub were written by many transformers versions: rope settings come as
v4's ``rope_theta`` + ``rope_scaling`` (+ Gemma-3's ``rope_local_base_freq``) or v5's
``rope_parameters`` (flat, or one dict per layer type), and the per-layer attention
pattern as ``layer_types``, Gemma-3's older ``sliding_window_pattern``, or nothing at all
(the model class's default). Writers read them here, in one place, so that every format
computes what transformers computes.
"""
from __future__ import annotations

from typing import Any

#: rope bases a family's config class falls back to: (global, sliding) layers
_THETA_DEFAULTS = {
    "gemma3_text": (1_000_000.0, 10_000.0),
    "gemma3": (1_000_000.0, 10_000.0),
}
_PER_TYPE = ("full_attention", "sliding_attention")


def _model_type(config: dict[str, Any], model_type: str | None) -> str:
    return str(model_type or config.get("model_type") or "")


def _per_type(params: Any) -> bool:
    return isinstance(params, dict) and any(isinstance(params.get(k), dict) for k in _PER_TYPE)


def rope_parameters(config: dict[str, Any], layer_type: str = "full_attention",
                    model_type: str | None = None) -> dict[str, Any]:
    """The rope settings of ``layer_type`` layers as one flat dict in transformers 5's
    form: ``rope_type`` (always set), ``rope_theta`` (always set) and the type's own keys
    (``factor``, ``original_max_position_embeddings``, ``low_freq_factor``, ...;
    ``partial_rotary_factor`` when the config has one). Reads v5 ``rope_parameters``
    (flat or per layer type) and v4 ``rope_theta`` / ``rope_scaling`` /
    ``rope_local_base_freq`` alike, with the family's defaults where the config is silent.
    """
    mt = _model_type(config, model_type)
    theta_full, theta_local = _THETA_DEFAULTS.get(mt, (10_000.0, None))
    params = config.get("rope_parameters")
    if _per_type(params):
        out = dict(params.get(layer_type) or params.get("full_attention") or {})
        if "partial_rotary_factor" in params:
            out.setdefault("partial_rotary_factor", params["partial_rotary_factor"])
    elif isinstance(params, dict) and params:
        out = dict(params)
        if layer_type == "sliding_attention" and theta_local is not None:
            # a flat dict in a family with two bases: the sliding layers keep their own
            out = {"rope_type": "default",
                   "rope_theta": config.get("rope_local_base_freq", theta_local)}
    else:
        scaling = config.get("rope_scaling")
        out = dict(scaling) if isinstance(scaling, dict) else {}
        out.setdefault("rope_theta", config.get("rope_theta", theta_full))
        if layer_type == "sliding_attention" and theta_local is not None:
            out = {"rope_type": "default",
                   "rope_theta": config.get("rope_local_base_freq", theta_local)}
    if "type" in out:
        out.setdefault("rope_type", out.pop("type"))
    out["rope_type"] = str(out.get("rope_type") or "default")
    if out.get("rope_theta") is None:
        out["rope_theta"] = theta_local if (layer_type == "sliding_attention" and theta_local) else theta_full
    out["rope_theta"] = float(out["rope_theta"])
    if "partial_rotary_factor" not in out and config.get("partial_rotary_factor") not in (None, 1.0):
        out["partial_rotary_factor"] = float(config["partial_rotary_factor"])
    return out


def layer_types(config: dict[str, Any], model_type: str | None = None) -> list[str]:
    """``"full_attention"`` / ``"sliding_attention"`` per layer: ``layer_types`` when the
    config has it, else the model class's default (Gemma-2 alternates starting with a
    sliding layer; Gemma-3 makes every ``sliding_window_pattern``-th layer global, 6 when
    unset; Qwen2/3 slide from ``max_window_layers`` on when ``use_sliding_window``;
    the others slide on every layer when the config has a ``sliding_window``)."""
    mt = _model_type(config, model_type)
    n = int(config.get("num_hidden_layers") or 0)
    explicit_types = config.get("layer_types")
    if isinstance(explicit_types, list) and len(explicit_types) == n:
        return [str(t) for t in explicit_types]
    window = config.get("sliding_window")
    if mt == "gemma2":
        return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    if mt in ("gemma3_text", "gemma3"):
        pattern = int(config.get("sliding_window_pattern") or 6)
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    if mt in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        if not config.get("use_sliding_window") or window is None:
            return ["full_attention"] * n
        start = int(config.get("max_window_layers") or 0)
        return ["sliding_attention" if i >= start else "full_attention" for i in range(n)]
    # everyone else (mistral, mixtral, phi3, ...) slides on every layer when given a window
    return ["sliding_attention" if window else "full_attention"] * n


def sliding_pattern(types: list[str], only: int | None = None) -> int | None:
    """The period ``p`` when every ``p``-th layer is global and the rest slide (as
    Gemma-3's ``sliding_window_pattern`` and mlx-lm say it), else None; with ``only``,
    whether that period fits."""
    n = len(types)
    for p in ([only] if only else range(1, n + 2)):
        if types == ["sliding_attention" if (i + 1) % p else "full_attention" for i in range(n)]:
            return p
    return None
