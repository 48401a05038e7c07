"""Tiny quantized Hugging Face checkpoints, as the quantizers publish them, with known codes.

Each builder takes the tiny llama of :func:`convcore.testing.models.tiny_model`, quantizes
the linear layers of its decoder layers (embeddings and ``lm_head`` stay float32, as
quantizers leave them) and writes a copy in one layout: config.json with its
``quantization_config``, ``model.safetensors`` and the tokenizer files. It returns
``(directory, expected)``: ``expected`` maps each quantized layer's ``X.weight`` to the
float32 array its codes stand for, computed here from the codes and scales by the
layout's published formula (for compressed-tensors, by the library's own decompression),
never by convcore's reader. The packing below is written from the layouts' descriptions
(AutoGPTQ, AutoAWQ, DeepSeek-V3's fp8, compressed-tensors' compressors), independently
of :mod:`convcore.quantized`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from ..model import dtype_name
from ..safetensors_io import StreamingWriter, open_tensors
from .models import tiny_model

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FP8_MAX = 448.0
Expected = dict[str, np.ndarray]


def source(arch: str = "llama") -> tuple[Path, dict[str, Any], dict[str, np.ndarray]]:
    """The tiny model: its directory, config and float32 tensors."""
    path = tiny_model(arch)
    refs, _ = open_tensors(path / "model.safetensors")
    return path, json.loads((path / "config.json").read_text()), {n: np.array(r.load()) for n, r in refs.items()}


def linear_names(tensors: dict[str, np.ndarray]) -> list[str]:
    return [n for n in tensors if n.startswith("model.layers.") and n.rsplit(".", 2)[-2] in LINEAR]


def write_checkpoint(dst: str | Path, quantization_config: dict[str, Any] | None,
                     tensors: dict[str, np.ndarray], arch: str = "llama") -> Path:
    """``dst`` as an HF directory: the tiny model's tokenizer and other files, its config
    with ``quantization_config`` (None: without), and ``tensors`` in one safetensors file."""
    src, config, _ = source(arch)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, dst / f.name)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    arrays = {n: np.ascontiguousarray(a) for n, a in tensors.items()}
    writer = StreamingWriter(dst / "model.safetensors",
                             [(n, dtype_name(a.dtype), a.shape) for n, a in arrays.items()], {"format": "pt"})
    for n, a in arrays.items():
        writer.write(n, a)
    writer.close()
    return dst


# fp8 --------------------------------------------------------------------------------------
def fp8(dst: str | Path, block: tuple[int, int] | None = (128, 128), method: str = "fp8",
        per_channel: bool = False) -> tuple[Path, Expected]:
    """float8 e4m3 weights with float32 scales: ``X.weight_scale_inv`` per block of
    ``block`` (DeepSeek-V3's layout; edge blocks partial), per tensor (``block`` None, a
    0-d scale), or per output row in ``X.weight_scale`` (fbgemm_fp8, ``per_channel``)."""
    _, _, tensors = source()
    out, expected = dict(tensors), {}
    for name in linear_names(tensors):
        w = tensors[name]
        rows, cols = w.shape
        if per_channel:
            scale = (np.abs(w).max(axis=1, keepdims=True) / FP8_MAX).astype(np.float32)
            full = scale
        elif block is None:
            scale = np.array(np.abs(w).max() / FP8_MAX, np.float32)
            full = scale
        else:
            br, bc = block
            grid = np.zeros((-(-rows // br), -(-cols // bc)), np.float32)
            for i in range(grid.shape[0]):
                for j in range(grid.shape[1]):
                    grid[i, j] = np.abs(w[i * br:(i + 1) * br, j * bc:(j + 1) * bc]).max() / FP8_MAX
            scale = grid
            full = np.repeat(np.repeat(grid, br, axis=0), bc, axis=1)[:rows, :cols]
        codes = (w / full).astype(ml_dtypes.float8_e4m3fn)
        out[name] = codes
        out[name + ("_scale" if per_channel else "_scale_inv")] = scale
        expected[name] = codes.astype(np.float32) * full
    config = {"quant_method": method, "activation_scheme": "dynamic"}
    if method == "fp8":
        config.update(fmt="e4m3", weight_block_size=list(block) if block else None)
    else:
        config.update(activation_scale_ub=1200.0, modules_to_not_convert=["lm_head"])
    return write_checkpoint(dst, config, out), expected


# GPTQ and AWQ -------------------------------------------------------------------------------
def pack_along_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's qweight: row r of the result holds codes[r * 32/bits + j] at bit j * bits."""
    per = 32 // bits
    words = np.zeros((codes.shape[0] // per, codes.shape[1]), np.uint32)
    for j in range(per):
        words |= codes[j::per].astype(np.uint32) << np.uint32(bits * j)
    return words.view(np.int32)


def pack_along_cols(codes: np.ndarray, bits: int, order: tuple[int, ...] | None = None) -> np.ndarray:
    """Codes packed along the columns: word c holds column c * per + order[j] at bit j * bits
    (GPTQ's qzeros: order 0, 1, 2, ...; AWQ: 0, 2, 4, 6, 1, 3, 5, 7)."""
    per = 32 // bits
    order = order or tuple(range(per))
    words = np.zeros((codes.shape[0], codes.shape[1] // per), np.uint32)
    for j in range(per):
        words |= codes[:, order[j]::per].astype(np.uint32) << np.uint32(bits * j)
    return words.view(np.int32)


def _minmax_codes(wt: np.ndarray, groups: np.ndarray, n_groups: int, bits: int,
                  sym: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(codes, zeros, scales)`` of ``wt`` (in, out) in groups of inputs: scales float16,
    zeros round(-min / s) in [1, 2^bits - 1] (asym) or 2^(bits-1) (sym), codes
    round(w / s) + z clamped to [0, 2^bits - 1]."""
    maxq = (1 << bits) - 1
    n_out = wt.shape[1]
    scales = np.zeros((n_groups, n_out), np.float16)
    zeros = np.zeros((n_groups, n_out), np.int64)
    for g in range(n_groups):
        part = wt[groups == g]
        lo, hi = np.minimum(part.min(axis=0), 0), np.maximum(part.max(axis=0), 0)
        if sym:
            scales[g] = (2 * np.maximum(-lo, hi) / maxq).astype(np.float16)
            zeros[g] = 1 << (bits - 1)
        else:
            scales[g] = ((hi - lo) / maxq).astype(np.float16)
            zeros[g] = np.clip(np.round(-lo / scales[g].astype(np.float32)), 1, maxq)
    s = scales.astype(np.float32)[groups]
    codes = np.clip(np.round(wt / s) + zeros[groups], 0, maxq).astype(np.int64)
    return codes, zeros, scales


def gptq(dst: str | Path, bits: int = 4, group_size: int = 64, desc_act: bool = False, sym: bool = True,
         checkpoint_format: str = "gptq", g_idx: bool = True, seed: int = 0) -> tuple[Path, Expected]:
    """AutoGPTQ's layout: ``qweight`` (in * bits / 32, out), ``qzeros`` (groups, out * bits
    / 32) holding z - 1 in the v1 format ("gptq"), z in "gptq_v2", ``scales`` (groups,
    out) float16 and ``g_idx`` (in,): with ``desc_act`` the inputs' groups follow a
    shuffled order. Expected: ``(q - z) * s`` in float32, transposed to (out, in)."""
    rng = np.random.default_rng(seed)
    _, _, tensors = source()
    out, expected = dict(tensors), {}
    for name in linear_names(tensors):
        wt = tensors[name].T
        n_in, n_out = wt.shape
        size = group_size if group_size > 0 else n_in
        n_groups = -(-n_in // size)
        if desc_act:
            groups = np.empty(n_in, np.int64)
            groups[rng.permutation(n_in)] = np.arange(n_in) // size
        else:
            groups = np.arange(n_in) // size
        codes, zeros, scales = _minmax_codes(wt, groups, n_groups, bits, sym)
        stored = (zeros - 1) & ((1 << bits) - 1) if checkpoint_format == "gptq" else zeros
        module = name[:-len(".weight")]
        del out[name]
        out[module + ".qweight"] = pack_along_rows(codes, bits)
        out[module + ".qzeros"] = pack_along_cols(stored, bits)
        out[module + ".scales"] = scales
        if g_idx:
            out[module + ".g_idx"] = groups.astype(np.int32)
        expected[name] = np.ascontiguousarray(
            ((codes - zeros[groups]).astype(np.float32) * scales.astype(np.float32)[groups]).T)
    config = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
              "checkpoint_format": checkpoint_format, "damp_percent": 0.01, "true_sequential": True}
    return write_checkpoint(dst, config, out), expected


def awq(dst: str | Path, group_size: int = 64, zero_point: bool = True) -> tuple[Path, Expected]:
    """AutoAWQ's gemm layout: ``qweight`` (in, out / 8) and ``qzeros`` (groups, out / 8),
    4-bit codes packed along the outputs in the order 0, 2, 4, 6, 1, 3, 5, 7, ``scales``
    (groups, out) float16. Expected: ``(q - z) * s`` in float32, transposed."""
    _, _, tensors = source()
    out, expected = dict(tensors), {}
    for name in linear_names(tensors):
        wt = tensors[name].T
        n_in = wt.shape[0]
        groups = np.arange(n_in) // group_size
        codes, zeros, scales = _minmax_codes(wt, groups, -(-n_in // group_size), 4, not zero_point)
        module = name[:-len(".weight")]
        del out[name]
        out[module + ".qweight"] = pack_along_cols(codes, 4, (0, 2, 4, 6, 1, 3, 5, 7))
        if zero_point:
            out[module + ".qzeros"] = pack_along_cols(zeros, 4, (0, 2, 4, 6, 1, 3, 5, 7))
        out[module + ".scales"] = scales
        expected[name] = np.ascontiguousarray(
            ((codes - zeros[groups]).astype(np.float32) * scales.astype(np.float32)[groups]).T)
    config = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": zero_point,
              "version": "gemm", "modules_to_not_convert": None}
    return write_checkpoint(dst, config, out), expected


# compressed-tensors -----------------------------------------------------------------------------
def compressed(dst: str | Path, fmt: str, num_bits: int = 4, type: str = "int", strategy: str = "group",
               group_size: int | None = 64, block: list[int] | None = None, symmetric: bool = True,
               scale_dtype: str = "f32") -> tuple[Path, Expected]:
    """A compressed-tensors checkpoint written by the library's own compressor for ``fmt``
    (min-max scales and zero points chosen here, quantized and packed by the library);
    expected: the library's own ``decompress`` of each layer's compressed state, as float32
    (in the scale's type, ``scale_dtype``, as the library computes)."""
    import torch
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    args = QuantizationArgs(num_bits=num_bits, type=type, symmetric=symmetric, strategy=strategy,
                            group_size=group_size if strategy == "group" else None,
                            block_structure=block if strategy == "block" else None)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format=fmt)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    tdtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[scale_dtype]
    _, _, tensors = source()
    out, expected = dict(tensors), {}
    for name in linear_names(tensors):
        w = torch.from_numpy(tensors[name])
        scale, zero = _ct_params(w, num_bits, type, strategy, group_size, block, symmetric)
        state = {"weight": w, "weight_scale": scale.to(tdtype)}
        if zero is not None:
            state["weight_zero_point"] = zero
        packed = compressor.compress(state, scheme)
        module = name[:-len(".weight")]
        del out[name]
        for key, value in packed.items():
            out[f"{module}.{key}"] = _numpy(value)
        back = compressor.decompress({k: v.clone() for k, v in packed.items()}, scheme)["weight"]
        expected[name] = back.to(torch.float32).numpy()
    config = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, quantization_status="compressed",
                                ignore=["lm_head"]).model_dump()
    return write_checkpoint(dst, json.loads(json.dumps(config, default=str)), out), expected


def _ct_params(w: Any, bits: int, type: str, strategy: str, group_size: int | None, block: list[int] | None,
               symmetric: bool) -> tuple[Any, Any]:
    """Min-max ``(weight_scale, weight_zero_point)`` of the float32 torch matrix ``w`` in
    compressed-tensors' shapes: (1,), (rows, 1), (rows, groups) or the block grid."""
    import torch
    rows, cols = w.shape
    if strategy == "tensor":
        view = w.reshape(1, -1)
    elif strategy == "channel":
        view = w
    elif strategy == "group":
        view = w.reshape(rows * (cols // group_size), group_size)
    else:
        br, bc = block
        padded = torch.nn.functional.pad(w, (0, -cols % bc, 0, -rows % br))
        gr, gc = padded.shape[0] // br, padded.shape[1] // bc
        view = padded.reshape(gr, br, gc, bc).transpose(1, 2).reshape(gr * gc, br * bc)
    lo, hi = view.min(dim=1).values.clamp(max=0), view.max(dim=1).values.clamp(min=0)
    top = FP8_MAX if type == "float" else float((1 << (bits - 1)) - 1)
    if symmetric:
        scale, zero = torch.maximum(-lo, hi) / top, None
    else:
        scale = (hi - lo) / ((1 << bits) - 1)
        zero = (torch.round(-lo / scale) - (1 << (bits - 1))).clamp(-(1 << (bits - 1)), top).to(torch.int8)
    shape = {"tensor": (1,), "channel": (rows, 1), "group": (rows, cols // (group_size or 1))}.get(strategy)
    if shape is None:
        shape = (-(-rows // block[0]), -(-cols // block[1]))
    return scale.reshape(shape), (zero.reshape(shape) if zero is not None else None)


def _numpy(t: Any) -> np.ndarray:
    import torch
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    return t.contiguous().numpy()
