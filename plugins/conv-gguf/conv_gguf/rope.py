"""Rope scaling as llama.cpp stores it, and back.

- ``linear``: ``rope.scaling.type = linear`` and ``rope.scaling.factor``.
- ``yarn``: ``rope.scaling.type = yarn``, the factor, ``rope.scaling.original_context_length``
  and whichever of extrapolation / attention factor and beta fast / slow the config sets
  (llama.cpp's defaults are transformers' defaults for the rest).
- ``llama3``: no keys; a 1-D F32 tensor ``rope_freqs.weight`` of per-frequency divisors
  (1 for the high frequencies, ``factor`` for the low ones, a smooth ramp between) that
  llama.cpp divides each rotary frequency by.
- ``longrope`` (Phi-3 128k): F32 tensors ``rope_factors_long`` / ``rope_factors_short`` and
  ``rope.scaling.attn_factor``; llama.cpp takes the long factors when its context exceeds
  ``rope.scaling.original_context_length``, transformers when the sequence does.

Read back, the llama3 parameters are recovered from ``rope_freqs``: its divisors depend on
the four llama3 settings only through a line in the frequency, which two ramp points fix.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from convcore import ConvcoreError, hfconfig

#: rope types the gguf writer stores (transformers' names)
SUPPORTED = ("default", "linear", "llama3", "yarn", "longrope")
ROPE_FREQS = "rope_freqs.weight"
LONG, SHORT = "rope_factors_long.weight", "rope_factors_short.weight"
#: GGUF tensors that hold rope settings rather than weights
TENSORS = (ROPE_FREQS, LONG, SHORT)
# transformers' yarn keys -> llama.cpp's keys below "{arch}.rope.scaling."
_YARN_OPTIONAL = (("extrapolation_factor", "yarn_ext_factor"),
                  ("attention_factor", "yarn_attn_factor"),
                  ("beta_fast", "yarn_beta_fast"),
                  ("beta_slow", "yarn_beta_slow"))


def params(config: dict[str, Any]) -> dict[str, Any]:
    """The full-attention layers' rope settings (llama.cpp has one rope per model, plus
    the sliding layers' base for the families that keep two)."""
    return hfconfig.rope_parameters(config, "full_attention")


def check(config: dict[str, Any], source: str) -> None:
    """A one-line error for a rope llama.cpp cannot be told about."""
    kind = params(config)["rope_type"]
    if kind not in SUPPORTED:
        raise ConvcoreError(f"{source}: rope type {kind!r} cannot be stored in a GGUF "
                            f"(llama.cpp takes: {', '.join(SUPPORTED)})")
    p = params(config)
    if kind == "yarn" and p.get("truncate") is False:
        raise ConvcoreError(f"{source}: yarn rope with truncate=false cannot be stored in a GGUF "
                            "(llama.cpp always rounds the correction range)")


def _get(kind: str, key: str, cast=float):
    def value(config: dict[str, Any]) -> Any:
        p = params(config)
        if p["rope_type"] != kind or p.get(key) is None:
            return None
        return cast(p[key])
    return value


def scaling_type(config: dict[str, Any]) -> str | None:
    kind = params(config)["rope_type"]
    return kind if kind in ("linear", "yarn") and params(config).get("factor") is not None else None


def scaling_factor(config: dict[str, Any]) -> float | None:
    return float(params(config)["factor"]) if scaling_type(config) else None


def original_context(config: dict[str, Any]) -> int | None:
    """The pre-training context a long-context rope extends (rope settings first)."""
    value = params(config).get("original_max_position_embeddings") or config.get("original_max_position_embeddings")
    return int(value) if value else None


def attn_factor(config: dict[str, Any]) -> float | None:
    """``rope.scaling.attn_factor``, the cos/sin scale llama.cpp multiplies in last.
    LongRoPE: the config's, else transformers' default from the context ratio (as llama.cpp's
    converter writes it). YaRN with an explicit ``attention_factor``: transformers scales by
    it alone, llama.cpp by its own 1 + 0.1 ln(factor) times this key (it ignores
    ``yarn_attn_factor`` in YaRN mode, which its converter writes: 1.7e-2 rel err for
    attention_factor 1.0 at factor 4), so the key holds the quotient."""
    p = params(config)
    if p["rope_type"] == "yarn" and p.get("attention_factor") is not None:
        return float(p["attention_factor"]) / _yarn_mscale(float(p.get("factor") or 1.0))
    if p["rope_type"] != "longrope":
        return None
    if p.get("attention_factor") is not None:
        return float(p["attention_factor"])
    original = original_context(config) or int(config["max_position_embeddings"])
    factor = float(p.get("factor") or int(config["max_position_embeddings"]) / original)
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def _yarn_mscale(factor: float) -> float:
    """The cos/sin scale llama.cpp's YaRN applies itself: 1 + 0.1 ln(factor)."""
    return 1.0 + 0.1 * math.log(factor) if factor > 1.0 else 1.0


# (key below "{arch}.", value from the HF config, GGUF type, HF key): the hparams rows
HPARAMS = (
    ("rope.scaling.type", scaling_type, "str", None),
    ("rope.scaling.factor", scaling_factor, "f32", None),
    ("rope.scaling.original_context_length", _get("yarn", "original_max_position_embeddings", int),
     "u32", None),
    *((f"rope.scaling.{gg}", _get("yarn", hf), "f32", None) for hf, gg in _YARN_OPTIONAL),
    ("rope.scaling.attn_factor", attn_factor, "f32", None),
)


def llama3_divisors(config: dict[str, Any]) -> np.ndarray | None:
    """``rope_freqs`` for a llama3 rope (None for other types): per rotary frequency the
    divisor llama.cpp applies, computed in float32 as llama.cpp's converter does. The
    original context comes from the rope settings (where transformers reads it)."""
    p = params(config)
    if p["rope_type"] != "llama3":
        return None
    dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    base = np.float32(p["rope_theta"])
    freqs = np.float32(1.0) / (base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    factor = float(p.get("factor", 8.0))
    low, high = float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0))
    old = float(p.get("original_max_position_embeddings")
                or config.get("original_max_position_embeddings") or 8192)
    low_wavelen, high_wavelen = old / low, old / high
    out = np.empty(len(freqs), dtype=np.float32)
    for i, freq in enumerate(freqs):
        wavelen = np.float32(2 * math.pi) / freq
        if wavelen < high_wavelen:
            out[i] = 1.0
        elif wavelen > low_wavelen:
            out[i] = factor
        else:
            smooth = (np.float32(old) / wavelen - np.float32(low)) / np.float32(high - low)
            out[i] = np.float32(1) / ((np.float32(1) - smooth) / np.float32(factor) + smooth)
    return out


def extra_tensors(config: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
    """GGUF tensors the rope needs beside the model's own: ``(gguf name, array)``."""
    divisors = llama3_divisors(config)
    if divisors is not None:
        return [(ROPE_FREQS, divisors)]
    p = params(config)
    if p["rope_type"] == "longrope":
        return [(LONG, np.asarray(p["long_factor"], np.float32)),
                (SHORT, np.asarray(p["short_factor"], np.float32))]
    return []


def _llama3_from_divisors(divisors: np.ndarray, theta: float, dim: int) -> dict[str, Any]:
    """llama3 settings that give ``divisors`` back (see the module docstring)."""
    d = divisors.astype(np.float64)
    factor = float(d.max())
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * math.pi / freqs
    candidates = []
    if factor > 1.0:
        mid = (d > 1.0 + 1e-6) & (d < factor * (1 - 1e-6))
        if mid.sum() >= 2:
            # 1/divisor = (1 - s)/factor + s  ->  s, a line in the frequency: s = a*f + b
            s = (1.0 / d[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)
            a, b = np.polyfit(freqs[mid], s, 1)
            if a > 0 and b < 0:
                low = 1.0
                high = low - 1.0 / b
                old = a * 2 * math.pi * (high - low)
                # published settings are round numbers: try them rounded first
                candidates += [(low, round(high, 3), float(round(old))), (low, high, old)]
        ones, scaled = wavelen[d <= 1.0 + 1e-6], wavelen[d >= factor * (1 - 1e-6)]
        if not mid.any() and len(ones) and len(scaled) and ones.max() < scaled.min():
            w1, w2 = ones.max(), scaled.min()
            old = w1 + 2 * (w2 - w1) / 3
            candidates.append((1.0, old / (w1 + (w2 - w1) / 3), old))
    for low, high, old in candidates + [(1.0, 4.0, 8192.0)]:
        found = {"rope_type": "llama3", "rope_theta": theta, "factor": factor,
                 "low_freq_factor": float(low), "high_freq_factor": float(high),
                 "original_max_position_embeddings": int(round(old))
                 if abs(old - round(old)) < 1e-3 else float(old)}
        again = llama3_divisors({"head_dim": dim, "rope_parameters": found})
        if again is not None and np.allclose(again, divisors, rtol=1e-4, atol=0):
            return found
    raise ConvcoreError("rope_freqs.weight does not follow Llama-3's rope scaling formula")


def read(kv: dict[str, Any], arch: str, extra: dict[str, np.ndarray], head_dim: int) -> dict[str, Any]:
    """``rope_parameters`` (transformers 5) from a GGUF's keys and rope tensors."""
    theta = float(kv.get(f"{arch}.rope.freq_base", 10000.0))
    kind = kv.get(f"{arch}.rope.scaling.type")
    key = f"{arch}.rope.scaling."
    if ROPE_FREQS in extra:
        return _llama3_from_divisors(np.asarray(extra[ROPE_FREQS]), theta, head_dim)
    if LONG in extra and SHORT in extra:
        out = {"rope_type": "longrope", "rope_theta": theta,
               # the shortest decimals that are these float32 values (1.02, not 1.0199999809)
               "long_factor": [float(str(np.float32(x))) for x in extra[LONG]],
               "short_factor": [float(str(np.float32(x))) for x in extra[SHORT]]}
        if f"{key}original_context_length" in kv:
            out["original_max_position_embeddings"] = int(kv[f"{key}original_context_length"])
        attn, ctx = kv.get(f"{key}attn_factor"), kv.get(f"{arch}.context_length")
        original = out.get("original_max_position_embeddings")
        if attn is not None and not (ctx and original and math.isclose(
                float(attn), attn_factor({"max_position_embeddings": ctx, "rope_parameters": dict(out)}),
                rel_tol=1e-6)):
            out["attention_factor"] = float(attn)   # only when it is not transformers' default
        return out
    if kind == "linear" and f"{key}factor" in kv:
        return {"rope_type": "linear", "rope_theta": theta, "factor": float(kv[f"{key}factor"])}
    if kind == "yarn" and f"{key}factor" in kv:
        out = {"rope_type": "yarn", "rope_theta": theta, "factor": float(kv[f"{key}factor"])}
        if f"{key}original_context_length" in kv:
            out["original_max_position_embeddings"] = int(kv[f"{key}original_context_length"])
        for hf, gg in _YARN_OPTIONAL:
            if f"{key}{gg}" in kv and hf != "attention_factor":   # llama.cpp ignores that one
                out[hf] = float(kv[f"{key}{gg}"])
        if f"{key}attn_factor" in kv:   # the scale llama.cpp computes with this key
            out["attention_factor"] = float(str(np.float32(kv[f"{key}attn_factor"] * _yarn_mscale(out["factor"]))))
        return out
    if kind not in (None, "none", "linear", "yarn"):
        raise ConvcoreError(f"rope scaling type {kind!r} cannot be read back to HF")
    return {"rope_type": "default", "rope_theta": theta}
