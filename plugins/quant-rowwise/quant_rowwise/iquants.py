"""GGUF IQ types (llama.cpp's "i-quants") in ggml's block layouts: the schemes.

Each type's kernels live in a module of their own, imported (with numba) on first use:
``iq4`` (iq4_nl, iq4_xs), ``iq3`` (iq3_xxs, iq3_s), ``iq2`` (iq2_xxs, iq2_xs, iq2_s) and
``iq1`` (iq1_s, iq1_m). Each module offers

- ``quantize(name, array, weights) -> uint8 ndarray (*array.shape[:-1], row_bytes)``:
  ``array`` f32/f16/bf16 with rows of a whole number of blocks, ``weights`` None or the
  float32 importance of each column (shape ``(row_length,)``), as llama.cpp's
  ``quantize_<type>`` takes ``quant_weights``;
- ``dequantize(name, blocks, shape) -> float32 ndarray`` equal to ``gguf.quants.dequantize``.

The types llama.cpp will not make without an importance matrix (``NEEDS_IMATRIX``) raise
:class:`IQuantError` when ``weights`` is missing.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import numpy as np

import convcore

# name -> (values per block, bytes per block, kernel module)
IQ_TYPES: dict[str, tuple[int, int, str]] = {
    "iq4_nl": (32, 18, "iq4"), "iq4_xs": (256, 136, "iq4"),
    "iq3_xxs": (256, 98, "iq3"), "iq3_s": (256, 110, "iq3"),
    "iq2_xxs": (256, 66, "iq2"), "iq2_xs": (256, 74, "iq2"), "iq2_s": (256, 82, "iq2"),
    "iq1_s": (256, 50, "iq1"), "iq1_m": (256, 56, "iq1"),
}
# llama.cpp's ggml_quantize_requires_imatrix
NEEDS_IMATRIX = ("iq2_xxs", "iq2_xs", "iq1_s", "iq1_m")


class IQuantError(convcore.ConvcoreError, ValueError):
    """Bad input to an IQ type: a row length, a dtype, NaN/Inf, a missing importance matrix."""


def _module(name: str) -> Any:
    return importlib.import_module(f"{__package__}.{IQ_TYPES[name][2]}")


def _check(array: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(array)
    block = IQ_TYPES[name][0]
    if arr.ndim == 0 or arr.shape[-1] == 0 or arr.shape[-1] % block:
        raise IQuantError(f"{name} needs rows of a multiple of {block} values, "
                          f"found shape {arr.shape}")
    kind = convcore.dtype_name(arr.dtype) if arr.dtype.kind in "fV" else str(arr.dtype)
    if kind not in ("f32", "f16", "bf16"):
        raise IQuantError(f"{name} takes f32, f16 or bf16 input, found {arr.dtype}")
    return arr


def _weights(options: dict[str, Any], n: int, name: str) -> np.ndarray | None:
    weights = options.get("weights")
    if weights is None:
        if name in NEEDS_IMATRIX:
            raise IQuantError(f"{name} needs an importance matrix "
                              "(make one with `convcore imatrix`, pass it with --imatrix)")
        return None
    w = np.ascontiguousarray(weights, dtype=np.float32)
    if w.shape != (n,):
        raise IQuantError(f"{name}: importance of shape {w.shape} for rows of {n} values")
    return w


def quantize_iq(array: np.ndarray, name: str, options: dict[str, Any] | None = None) -> dict:
    options = options or {}
    # (the registry names the tensor in its error messages)
    arr = _check(array, name)
    weights = _weights(options, arr.shape[-1], name)
    return {"blocks": _module(name).quantize(name, arr, weights)}


def prepare(names: list[str], dtypes: list[str]) -> None:
    """Scheme.prepare of the IQ types: each one's kernels (without an importance vector,
    or with one for the types that need it) loaded from the kernel cache, or compiled, by
    quantizing one row, so a writer has them before its data is in memory (loading them
    mid-conversion added ~30 MB to a 2 GB tensor's peak)."""
    row = np.linspace(-1.0, 1.0, 256, dtype=np.float32)[None]
    for name in names:
        if name in IQ_TYPES:
            quantize_iq(row, name, {"weights": np.ones(256, np.float32)} if name in NEEDS_IMATRIX else None)


def dequantize_iq(data: dict[str, np.ndarray], shape: tuple[int, ...], name: str) -> np.ndarray:
    shape = tuple(int(s) for s in shape)
    block, size, _ = IQ_TYPES[name]
    if not shape or shape[-1] % block:
        raise IQuantError(f"{name}: row length must be a multiple of {block}, found shape {shape}")
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    blocks = np.ascontiguousarray(data["blocks"], dtype=np.uint8)
    want = rows * shape[-1] // block * size
    if blocks.size != want:
        raise IQuantError(f"{name}: expected {want} block bytes for shape {shape}, found {blocks.size}")
    return _module(name).dequantize(name, blocks.reshape(rows, -1), shape)


def _scheme(name: str) -> convcore.Scheme:
    block, size, _ = IQ_TYPES[name]

    def layout(shape: tuple[int, ...], dtype: str) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {"blocks": ("u8", (*shape[:-1], shape[-1] // block * size))}

    needs = " (needs an importance matrix)" if name in NEEDS_IMATRIX else ""
    return convcore.Scheme(
        name=name, block_size=block, bits=size * 8 / block, family="gguf", layout=layout,
        quantize=lambda a, o=None: quantize_iq(a, name, o), prepare=prepare,
        dequantize=lambda d, s: dequantize_iq(d, s, name),
        description=f"GGUF {name.upper()}: blocks of {block}, {size * 8 / block:.4g} bits per "
                    f"weight, llama.cpp's grid search{needs}")


def available() -> list[str]:
    """The IQ types whose kernel module is present."""
    out = []
    for name, (_, _, module) in IQ_TYPES.items():
        if importlib.util.find_spec(f"{__package__}.{module}") is not None:
            out.append(name)
    return out


# registered only for the types whose kernels this installation has
SCHEMES: list[convcore.Scheme] = [_scheme(n) for n in available()]
