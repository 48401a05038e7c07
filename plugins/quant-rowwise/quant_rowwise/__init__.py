"""quant-rowwise: the quantization math of convcore, as Numba kernels.

Registers the schemes (GGUF blocks q8_0 q4_0 q4_1 q5_0 q5_1, k-quants q2_k..q6_k, MLX
affine int{2,3,4,5,6,8}-g{32,64,128}, per-row int{1,2,4,8}-row, int8-row-sym,
int8-tensor, ONNX Runtime MatMulNBits blocks int{4,8}-b{16,32,64,128,256} (symmetric)
and int{4,8}-b{16,32,64,128,256}-asym (with zero points), byte-identical with
onnxruntime's quantizer) and the ``npz`` format (APL layout). Format plugins use the
schemes by name through ``convcore.quantize``; none imports this package.

Registration is cheap: the kernel modules (and numba) are imported on a scheme's first
use, so ``convcore`` commands that quantize nothing never pay for them.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any, Callable

import convcore

from . import iquants, kquants
from .npz import convcore_load, convcore_validate, convcore_write, register_npz  # noqa: F401

__version__ = "0.1.0"

LEGACY_SIZES = {"q8_0": 34, "q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24}
AFFINE = [(b, g) for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128)]
ROW_BITS = (1, 2, 4, 8)
MATMULNBITS = [(b, k, sym) for b in (4, 8) for k in (16, 32, 64, 128, 256) for sym in (True, False)]


def _kernels(module: str) -> Any:
    return importlib.import_module(f"{__name__}.{module}")


def _rows(shape: tuple[int, ...]) -> int:
    """How many rows the per-row kernels see: every axis but the last, flattened."""
    return math.prod(shape[:-1])


def _legacy_layout(size: int) -> Callable[[tuple[int, ...], str], dict]:
    return lambda shape, dtype: {"blocks": ("u8", (*shape[:-1], shape[-1] // 32 * size))}


def _affine_layout(bits: int, group: int) -> Callable[[tuple[int, ...], str], dict]:
    # scales and biases keep the input's float type, as mx.quantize does
    def layout(shape: tuple[int, ...], dtype: str) -> dict:
        lead, n = tuple(shape[:-1]), shape[-1]
        return {"weight": ("u32", (*lead, n * bits // 32)),
                "scales": (dtype, (*lead, n // group)), "biases": (dtype, (*lead, n // group))}
    return layout


def _asym_layout(bits: int) -> Callable[[tuple[int, ...], str], dict]:
    return lambda shape, dtype: {"q": ("u8", (_rows(shape), -(-shape[-1] * bits // 8))),
                                 "scales": ("f32", (_rows(shape),)),
                                 "zero_points": ("f32", (_rows(shape),))}


def _sym_layout(per_tensor: bool) -> Callable[[tuple[int, ...], str], dict]:
    return lambda shape, dtype: {"q": ("i8", (_rows(shape), shape[-1])),
                                 "scales": ("f32", (1 if per_tensor else _rows(shape),))}


def _matmulnbits_layout(bits: int, block: int, sym: bool) -> Callable[[tuple[int, ...], str], dict]:
    # ORT's MatMulNBits initializers: q [rows, n_blocks, block*bits/8], scales
    # [rows, n_blocks] f32 whatever the input, zero points packed like the codes
    def layout(shape: tuple[int, ...], dtype: str) -> dict:
        rows, n_blocks = _rows(shape), -(-shape[-1] // block)
        out = {"q": ("u8", (rows, n_blocks, block * bits // 8)), "scales": ("f32", (rows, n_blocks))}
        if not sym:
            out["zero_points"] = ("u8", (rows, -(-n_blocks * bits // 8)))
        return out
    return layout


def _schemes() -> list[convcore.Scheme]:
    out = []
    for kind, size in LEGACY_SIZES.items():
        out.append(convcore.Scheme(
            name=kind, block_size=32, bits=size * 8 / 32, family="gguf",
            quantize=lambda a, o=None, k=kind: _kernels("legacy").quantize(
                k, a, (o or {}).get("weights")),
            dequantize=lambda d, s, k=kind: _kernels("legacy").dequantize(k, d, s),
            layout=_legacy_layout(size),
            # one prepare with the k-quants': warmup compiles all the GGUF kernels side by side
            prepare=kquants.prepare,
            description=f"GGUF {kind.upper()}: blocks of 32, bit-exact with ggml's reference"))
    out.extend(kquants.SCHEMES)  # kquants imports its kernels (and numba) on first use
    out.extend(iquants.SCHEMES)  # likewise
    for bits, group in AFFINE:
        out.append(convcore.Scheme(
            name=f"int{bits}-g{group}", block_size=group, bits=bits + 32 / group, family="affine",
            quantize=lambda a, o=None, b=bits, g=group: _kernels("affine").quantize(b, g, a),
            dequantize=lambda d, s, b=bits, g=group: _kernels("affine").dequantize(b, g, d, s),
            layout=_affine_layout(bits, group),
            description=f"MLX affine {bits}-bit in groups of {group} (mx.quantize layout)"))
    for bits in ROW_BITS:
        out.append(convcore.Scheme(
            name=f"int{bits}-row", block_size=1, bits=float(bits), family="row",
            quantize=lambda a, o=None, b=bits: _kernels("rows").quantize_asym(
                b, a, (o or {}).get("search", "mse")),
            dequantize=lambda d, s, b=bits: _kernels("rows").dequantize_asym(b, d, s),
            layout=_asym_layout(bits),
            description=f"{bits}-bit asymmetric, scale and zero point per row (least squares; "
                        "option search=minmax for min/max)"))
    for name, per_tensor in (("int8-row-sym", False), ("int8-tensor", True)):
        out.append(convcore.Scheme(
            name=name, block_size=1, bits=8.0, family="row",
            quantize=lambda a, o=None, t=per_tensor: _kernels("rows").quantize_sym(
                a, t, (o or {}).get("absmax") if t else None),
            dequantize=lambda d, s: _kernels("rows").dequantize_sym(d, s),
            layout=_sym_layout(per_tensor),
            description="int8 symmetric, " + ("one scale (option absmax: the whole tensor's, "
                                                 "for a piece of it)" if per_tensor else "scale per row")))
    for bits, block, sym in MATMULNBITS:
        # block_size 1: MatMulNBits pads a short last block, so any row length works
        out.append(convcore.Scheme(
            name=f"int{bits}-b{block}" + ("" if sym else "-asym"), block_size=1,
            bits=bits + 32 / block + (0 if sym else bits / block), family="matmulnbits",
            quantize=lambda a, o=None, b=bits, k=block, s=sym:
                _kernels("matmulnbits").quantize(b, k, s, a),
            dequantize=lambda d, sh, b=bits, k=block, s=sym:
                _kernels("matmulnbits").dequantize(b, k, s, d, sh),
            layout=_matmulnbits_layout(bits, block, sym),
            description=f"ONNX Runtime MatMulNBits {bits}-bit in blocks of {block} along the row, "
                        + (f"symmetric (zero point {1 << (bits - 1)})" if sym else "with zero points")
                        + f", byte-identical with onnxruntime's quantize_matmul_{bits}bits"))
    return out


# What `convcore run --check` holds each scheme to on the bundled text, by the bits its
# codes carry: mean KL(source||output) at most "kl" nats, top-1 agreement at least "top1".
# Chosen for trained models, a few times above the order of magnitude llama.cpp's
# `perplexity --kl-divergence` reports for 7-8B models at each bit width. Random weights
# have no redundancy to lose and drift much further (a tiny random llama at 4 bits: KL
# ~0.3), so tests on them pass explicit --check-kl / --check-top1 limits.
TOLERANCE_BY_BITS = {8: {"kl": 0.01, "top1": 0.95}, 6: {"kl": 0.03, "top1": 0.92},
                     5: {"kl": 0.06, "top1": 0.90}, 4: {"kl": 0.15, "top1": 0.85},
                     3: {"kl": 0.40, "top1": 0.75}, 2: {"kl": 1.00, "top1": 0.60},
                     1: {"kl": 2.50, "top1": 0.40}}


def code_bits(name: str) -> int:
    """The bits of a scheme's codes, from its name (q4_k_m -> 4, int8-row -> 8)."""
    head = name.split("-")[0].split("_")[0]
    return int(head.lstrip("qint"))


def _with_tolerance(scheme: convcore.Scheme) -> convcore.Scheme:
    tolerance = dict(TOLERANCE_BY_BITS[code_bits(scheme.name)])
    if scheme.name == "int8-tensor":  # one scale for the whole tensor
        tolerance = dict(TOLERANCE_BY_BITS[6])
    return dataclasses.replace(scheme, tolerance=tolerance, quantize=_with_threads(scheme.quantize))


def _with_threads(quantize: Callable[..., Any]) -> Callable[..., Any]:
    """``quantize`` honouring the option ``threads``: the most threads its kernels use
    for this call (a writer that quantizes on several threads of its own asks for 1, so
    the kernels' threads do not contend with its own). The codes are the same."""
    def run(array: Any, options: dict[str, Any] | None = None) -> Any:
        threads = (options or {}).get("threads")
        if not threads:
            return quantize(array, options)
        from . import _threads
        with _threads.limited(int(threads)):
            return quantize(array, options)
    return run


@convcore.hookimpl
def convcore_register_schemes(register: Callable[..., None]) -> None:
    for scheme in _schemes():
        register(_with_tolerance(scheme))


@convcore.hookimpl
def convcore_register_formats(register: Callable[..., None]) -> None:
    register_npz(register)
