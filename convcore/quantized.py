"""Quantized Hugging Face checkpoints as conversion sources.

When config.json has a ``quantization_config``, :func:`dequantized_model` gives each
quantized layer back as a plain ``X.weight``: a lazy float32 :class:`TensorRef` of the
original shape that dequantizes a block of rows at a time when a writer reads it
(:func:`convcore.row_block_loaders`); loading reads only headers and compressed-tensors'
few-byte ``weight_shape`` tensors. The companions (scales, zero points, packed codes,
group indexes) and the activation and kv-cache scales leave the tensor list, and
``quantization_config`` leaves the config: the output is no longer quantized that way.

- ``fp8`` (and ``fbgemm_fp8``): float8 ``X.weight`` times ``X.weight_scale_inv`` (or
  ``X.weight_scale``) of its block of ``weight_block_size`` (DeepSeek-V3, Qwen3-FP8;
  edge blocks may be partial), or one per tensor, or one per output row.
- ``compressed-tensors`` (llm-compressor): formats float-quantized, int-quantized,
  naive-quantized (the codes stored as they are in ``X.weight``) and pack-quantized
  (``X.weight_packed`` int32, ``X.weight_shape``); any of them per config group
  (mixed-precision); strategies tensor, channel, group (also with ``X.weight_g_idx``) and
  block; symmetric, or with ``X.weight_zero_point``. ``W = (q - z) * s``.
- ``gptq`` and ``awq``: :mod:`convcore.quantized_gptq`.

Anything else (bitsandbytes, hqq, exl2, nvfp4, sparse or rotated compressed-tensors, ...)
is refused in one line naming config.json; a tensor without its scales, in one line
naming its file and the tensor.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .model import ConvcoreError, TensorRef, cast
from .quantized_gptq import SCALE_DTYPES, Replaced, awq_tensors, check, gptq_tensors, need, streamed, unpack

#: scales of activations and of the kv cache: gone with the quantization
ACTIVATION_LEAVES = frozenset((
    "input_scale", "input_zero_point", "input_global_scale", "output_scale", "output_zero_point",
    "k_scale", "v_scale", "q_scale", "kv_scale", "activation_scale"))
#: compressed-tensors' per-weight parameters, dropped beside a weight read as it is
CT_PARAMS = ("weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape", "weight_global_scale")
CT_FORMATS = ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized", "dense", "mixed-precision")
FLOAT8 = ("f8_e4m3", "f8_e5m2")
CODES = ("i8", "i16", "i32", "u8") + FLOAT8


def dequantized_model(config: dict[str, Any], tensors: dict[str, TensorRef],
                      path: str | Path) -> tuple[dict[str, Any], dict[str, TensorRef], str]:
    """``(config, tensors, description)`` of the quantized HF checkpoint in the directory
    ``path``: ``config`` without ``quantization_config``; ``tensors`` in their order with
    each quantized layer a lazy float32 ``X.weight`` in its anchor's place and the
    companions dropped; ``description`` says what was read (``"gptq 4-bit g128 desc_act
    asym"``) for ``metadata["source_quantization"]``."""
    where = Path(path) / "config.json"
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        raise ConvcoreError(f"{where}: quantization_config is {type(qc).__name__}, not a JSON object")
    method = str(qc.get("quant_method") or "").lower()
    readers: dict[str, Callable[..., Replaced]] = {
        "fp8": _fp8, "fbgemm_fp8": _fp8, "compressed-tensors": _compressed, "gptq": gptq_tensors, "awq": awq_tensors}
    if not method and {"bits", "group_size"} <= set(qc):
        raise ConvcoreError(f"{where}: quantization_config has no quant_method; its bits and group_size are an MLX "
                            "model's, which format mlx reads (--from mlx)")
    if method not in readers:
        raise ConvcoreError(f"{where}: quantization_config.quant_method {qc.get('quant_method')!r} is not supported as "
                            "a conversion source (convcore reads fp8, compressed-tensors, gptq and awq checkpoints)")
    replaced, dropped, description = readers[method](qc, tensors, where)
    out: dict[str, TensorRef] = {}
    for name, ref in tensors.items():
        if name in replaced:
            new = replaced[name]
            if new.name in out or (new.name in tensors and new.name not in replaced and new.name not in dropped):
                raise ConvcoreError(f"{ref.source}: tensor {name!r} dequantizes to {new.name!r}, which the "
                                    "checkpoint also holds")
            out[new.name] = new
        elif name not in dropped and name.rsplit(".", 1)[-1] not in ACTIVATION_LEAVES:
            out[name] = ref
    return {k: v for k, v in config.items() if k != "quantization_config"}, out, description


# the affine dequantization every non-GPTQ layout shares ------------------------------------
def _grid(shape: tuple[int, ...], scale: TensorRef, sizes: tuple[int, int | None] | None,
          weight: str) -> tuple[int, int, int, int, int]:
    """``(experts, grid_rows, grid_cols, block_rows, block_cols)``: how ``scale`` (one value
    per tensor, per row, per group of a row or per block) covers the 2-D weight ``shape``
    (leading axes: experts). ``sizes``: the block the config says, ``cols`` None when a
    g_idx picks the column's group; without it the block is what divides the weight."""
    n, k = shape[-2], shape[-1]
    experts = math.prod(shape[:-2])
    s = tuple(scale.shape)
    if math.prod(s) == 1:
        return 1, 1, 1, n, k
    grid = (1, n, 1) if len(s) == 1 and s[0] == n else (math.prod(s[:-2]), *s[-2:]) if len(s) >= 2 else None
    rb, cb = 0, 0
    if sizes is not None:
        rb, cb = sizes
    elif grid is not None and grid[1] and grid[2]:
        rb = n // grid[1] if n % grid[1] == 0 else 0
        cb = k // grid[2] if k % grid[2] == 0 else 0
    if (grid is None or grid[0] not in (1, experts) or not rb or -(-n // rb) != grid[1]
            or (cb is not None and (not cb or -(-k // cb) != grid[2]))):
        block = f" in blocks of {rb}x{cb}" if sizes is not None and cb else ""
        raise ConvcoreError(f"{scale.source}: tensor {scale.name!r} is {scale.dtype}{list(s)}, which does not "
                            f"cover {weight!r} {list(shape)}{block}")
    return grid[0], grid[1], grid[2], rb, cb or 0


def _affine(name: str, shape: tuple[int, ...], codes: Callable[[int, int], np.ndarray], scale: TensorRef,
            zero: Callable[[], np.ndarray] | None, sizes: tuple[int, int | None] | None,
            g_idx: TensorRef | None, stored: str, parts: list[TensorRef]) -> TensorRef:
    """The float32 tensor ``name``: ``(codes - zero) * scale`` row block by row block, the
    scale (and zero point, same grid) of each value picked from its block of the grid."""
    n, k = shape[-2], shape[-1]
    grids, grid_rows, grid_cols, rb, cb = _grid(shape, scale, sizes, name)   # grids: 1, or one per expert
    if g_idx is not None:
        check(g_idx, ("i32", "i64"), (k,))

    def pick(values: np.ndarray, e: Any, r: np.ndarray, cols: np.ndarray | None) -> np.ndarray:
        chosen = cast(np.asarray(values.reshape(grids, grid_rows, grid_cols)[e, r // rb]), "f32")   # (rows, grid_cols)
        return chosen if cols is None else chosen[:, cols]

    def rows(a: int, b: int) -> np.ndarray:
        r = np.arange(a, b)
        e = r // n if grids > 1 else 0
        r = r % n
        cols = None
        if g_idx is not None:
            cols = np.asarray(g_idx.load()).astype(np.intp)
            if cols.size and (cols.min() < 0 or cols.max() >= grid_cols):
                raise ConvcoreError(f"{g_idx.source}: tensor {g_idx.name!r} names groups outside "
                                    f"[0, {grid_cols}) of {scale.name!r}")
        elif grid_cols > 1:
            cols = np.arange(k) // cb
        q = codes(a, b)
        if zero is not None:
            q = q - pick(zero(), e, r, cols)
        return q * pick(scale.load(), e, r, cols)

    return streamed(name, shape, rows, parts[0].source, stored, parts)


def _plain_codes(ref: TensorRef) -> Callable[[int, int], np.ndarray]:
    """Rows ``[a, b)`` of the codes stored as they are (int8, float8, ...) in float32."""
    k = ref.shape[-1]
    return lambda a, b: cast(np.asarray(ref.load().reshape(-1, k)[a:b]), "f32")


# fp8 ------------------------------------------------------------------------------------
def _fp8(qc: dict[str, Any], tensors: dict[str, TensorRef], where: Path) -> Replaced:
    """Every float8 tensor times its ``*_scale_inv`` (or ``*_scale``)."""
    block = qc.get("weight_block_size")
    if block is not None and not (isinstance(block, (list, tuple)) and len(block) == 2
                                  and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in block)):
        raise ConvcoreError(f"{where}: quantization_config.weight_block_size {block!r} is not two positive integers")
    replaced: dict[str, TensorRef] = {}
    dropped: set[str] = set()
    kinds: set[str] = set()
    formats: set[str] = set()
    for name, ref in tensors.items():
        if ref.dtype not in FLOAT8:
            continue
        scale = (tensors.get(name + "_scale_inv") or tensors.get(name + "_scale")
                 or need(tensors, name + "_scale_inv", ref))
        check(scale, SCALE_DTYPES)
        if len(ref.shape) < 2:
            raise ConvcoreError(f"{ref.source}: float8 tensor {name!r} has {len(ref.shape)} dimensions; "
                                "only matrices are read")
        shape = tuple(ref.shape)
        whole = math.prod(scale.shape) == 1
        per_row = tuple(scale.shape) == (shape[-2],) or tuple(scale.shape[-2:]) == (shape[-2], 1)
        sizes = tuple(block) if block and not whole and not per_row else None
        kind = ("per-tensor" if whole else "per-channel" if per_row else
                f"block {sizes[0]}x{sizes[1]}" if sizes else "blocks")
        kinds.add(kind)
        replaced[name] = _affine(name, shape, _plain_codes(ref), scale, None, sizes, None,
                                 f"{ref.dtype}-{kind.replace(' ', '-')}", [ref, scale])
        dropped.add(scale.name)
        formats.add(ref.dtype.removeprefix("f8_"))
    return replaced, dropped, (f"{qc.get('quant_method')} {'/'.join(sorted(formats))} {', '.join(sorted(kinds))}"
                               if kinds else f"{qc.get('quant_method')} (no float8 tensors)")


# compressed-tensors -----------------------------------------------------------------------
def _ct_args(name: str, group: Any, fmt: str, where: Path) -> dict[str, Any]:
    """A config group's weight scheme, checked: bits, type, symmetric, strategy, sizes."""
    weights = group.get("weights") if isinstance(group, dict) else None
    if not isinstance(weights, dict):
        raise ConvcoreError(f"{where}: compressed-tensors config group {name!r} quantizes no weights")
    fmt = str(group.get("format") or fmt)   # which tensors a layer has says how to read it
    if fmt not in CT_FORMATS:
        raise ConvcoreError(f"{where}: compressed-tensors format {fmt!r} is not supported as a conversion source "
                            "(float-quantized, int-quantized, naive-quantized and pack-quantized are)")
    bits, kind = weights.get("num_bits", 8), str(weights.get("type", "int"))
    group_size = weights.get("group_size")
    strategy = weights.get("strategy") or ("tensor" if group_size is None else
                                           "channel" if group_size == -1 else "group")
    if kind not in ("int", "float") or not isinstance(bits, int) or not 1 <= bits <= 8 or (kind == "float" and bits != 8):
        raise ConvcoreError(f"{where}: compressed-tensors weights of type {kind} with {bits} bits (config group "
                            f"{name!r}) are not supported as a conversion source (int 1-8 and float 8 are)")
    if strategy not in ("tensor", "channel", "group", "block"):
        raise ConvcoreError(f"{where}: compressed-tensors strategy {strategy!r} (config group {name!r}) is not "
                            "supported as a conversion source (tensor, channel, group and block are)")
    sizes, detail = None, ""
    if strategy == "group":
        if not isinstance(group_size, int) or group_size <= 0:
            raise ConvcoreError(f"{where}: compressed-tensors config group {name!r} has strategy group and "
                                f"group_size {group_size!r}")
        sizes, detail = (1, group_size), f" g{group_size}"
    elif strategy == "block":
        block = weights.get("block_structure")
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(v, int) and v > 0 for v in block)):
            raise ConvcoreError(f"{where}: compressed-tensors config group {name!r} has strategy block and "
                                f"block_structure {block!r}")
        sizes, detail = (block[0], block[1]), f" {block[0]}x{block[1]}"
    symmetric = bool(weights.get("symmetric", True))
    return {"format": fmt, "bits": bits, "type": kind, "symmetric": symmetric, "strategy": strategy,
            "sizes": sizes, "targets": [str(t) for t in group.get("targets") or []],
            "stored": f"{kind}{bits}-{detail.strip() if strategy == 'group' else strategy + detail.strip()}",
            "text": f"compressed-tensors {fmt} {kind}{bits} {strategy}{detail} {'sym' if symmetric else 'asym'}"}


def _scheme_for(module: str, schemes: list[dict[str, Any]], anchor: TensorRef, where: Path) -> dict[str, Any]:
    """The config group ``module`` belongs to: one naming it (exactly or by a ``re:``
    pattern) first, then one targeting a class (``Linear``), then the only group."""
    def named(target: str) -> bool:
        try:
            return target == module or (target.startswith("re:") and re.match(target[3:], module) is not None)
        except re.error as exc:
            raise ConvcoreError(f"{where}: compressed-tensors target {target!r} is not a valid pattern ({exc})") from None

    for test in (named, lambda t: t[:1].isupper() and "." not in t):
        found = next((s for s in schemes if any(test(t) for t in s["targets"])), None)
        if found is not None:
            return found
    if len(schemes) == 1:
        return schemes[0]
    raise ConvcoreError(f"{anchor.source}: tensor {anchor.name!r} is quantized, but no config group of "
                        f"{where.name}'s quantization_config targets {module!r}")


def _pack_width(anchor: TensorRef, bits: int, count: int, width: int) -> int:
    """``per_word`` for :func:`unpack` of ``count`` codes packed into ``width`` words: the
    dense layout of compressed-tensors since 0.13, or the older one code-aligned to words."""
    if width == -(-count * bits // 32):
        return 32 // bits if 32 % bits == 0 else 0
    if width == -(-count // (32 // bits)):
        return 32 // bits
    raise ConvcoreError(f"{anchor.source}: tensor {anchor.name!r} packs {width} words a row; {count} "
                        f"{bits}-bit codes take {-(-count * bits // 32)}")


def _compressed(qc: dict[str, Any], tensors: dict[str, TensorRef], where: Path) -> Replaced:
    fmt = str(qc.get("format") or "dense")
    sparsity = qc.get("sparsity_config") or {}
    if isinstance(sparsity, dict) and sparsity.get("format") not in (None, "dense"):
        raise ConvcoreError(f"{where}: compressed-tensors sparsity format {sparsity.get('format')!r} is not "
                            "supported as a conversion source")
    if qc.get("transform_config"):
        raise ConvcoreError(f"{where}: compressed-tensors transforms (transform_config) are not supported as a "
                            "conversion source")
    if fmt not in CT_FORMATS:
        raise ConvcoreError(f"{where}: compressed-tensors format {fmt!r} is not supported as a conversion source "
                            "(float-quantized, int-quantized, naive-quantized and pack-quantized are)")
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict):
        raise ConvcoreError(f"{where}: compressed-tensors config_groups is not a JSON object")
    schemes = [_ct_args(n, g, fmt, where) for n, g in groups.items()]
    replaced: dict[str, TensorRef] = {}
    dropped = {n for n in tensors if n.rsplit(".", 1)[-1] in CT_PARAMS}
    used: list[str] = []
    for name, ref in tensors.items():
        packed = name.endswith(".weight_packed")
        if not packed and not (name.endswith(".weight") and ref.dtype in CODES):
            continue
        module = name.rsplit(".", 1)[0]
        args = _scheme_for(module, schemes, ref, where)
        scale = need(tensors, module + ".weight_scale", ref)
        check(scale, SCALE_DTYPES)
        bits, strategy = args["bits"], args["strategy"]
        offset = 1 << (bits - 1)
        if packed:
            check(ref, ("i32",))
            shape_ref = need(tensors, module + ".weight_shape", ref)
            check(shape_ref, ("i64", "i32"), (len(ref.shape),))
            shape = tuple(int(v) for v in np.asarray(shape_ref.load()))   # a few bytes, read now
            if len(shape) < 2 or shape[:-1] != tuple(ref.shape[:-1]):
                raise ConvcoreError(f"{shape_ref.source}: tensor {shape_ref.name!r} says {list(shape)}, which "
                                    f"{name!r} {list(ref.shape)} does not pack")
            width, per_word = ref.shape[-1], _pack_width(ref, bits, shape[-1], ref.shape[-1])

            def codes(a: int, b: int, ref=ref, k=shape[-1], width=width, per_word=per_word, bits=bits,
                      offset=offset) -> np.ndarray:
                words = ref.load().reshape(-1, width)[a:b]
                return unpack(words, bits, k, per_word=per_word).astype(np.float32) - np.float32(offset)
        else:
            shape, codes = tuple(ref.shape), _plain_codes(ref)
            if len(shape) < 2:
                raise ConvcoreError(f"{ref.source}: quantized tensor {name!r} has {len(shape)} dimensions; "
                                    "only matrices are read")
        zero = None
        zref = tensors.get(module + ".weight_zero_point")
        if zref is not None and not args["symmetric"]:
            if packed and zref.dtype == "i32" and strategy in ("group", "channel"):
                # packed along the rows (axis -2), as pack-quantized keeps zero points
                n, cols = shape[-2], zref.shape[-1]
                if (len(zref.shape) != len(scale.shape) or tuple(zref.shape[:-2]) != tuple(scale.shape[:-2])
                        or cols != scale.shape[-1] or scale.shape[-2] != n):
                    raise ConvcoreError(f"{zref.source}: tensor {zref.name!r} is {zref.dtype}{list(zref.shape)}, "
                                        f"which does not pack zero points for {scale.name!r} {list(scale.shape)}")
                zper = _pack_width(zref, bits, n, zref.shape[-2])

                def zero(zref=zref, n=n, cols=cols, zper=zper, bits=bits, offset=offset) -> np.ndarray:
                    words = zref.load().reshape(-1, zref.shape[-2], cols)
                    return unpack(words, bits, n, axis=1, per_word=zper).astype(np.float32) - np.float32(offset)
            else:
                check(zref, CODES + SCALE_DTYPES, tuple(scale.shape))
                zero = (lambda zref=zref: zref.load())
        elif not args["symmetric"]:
            need(tensors, module + ".weight_zero_point", ref)
        g_idx = tensors.get(module + ".weight_g_idx") if strategy == "group" else None
        sizes = {"tensor": None, "channel": (1, shape[-1]), "group": args["sizes"], "block": args["sizes"]}[strategy]
        if strategy == "tensor" and math.prod(scale.shape) != math.prod(shape[:-2]):
            raise ConvcoreError(f"{scale.source}: tensor {scale.name!r} is {scale.dtype}{list(scale.shape)}, not one "
                                f"scale for {module + '.weight'!r} (strategy tensor)")
        if g_idx is not None:
            sizes = (1, None)
        parts = [p for p in (ref, scale, zref, g_idx) if p is not None]
        replaced[name] = _affine(module + ".weight", shape, codes, scale, zero, sizes, g_idx,
                                 args["stored"], parts)
        if args["text"] not in used:
            used.append(args["text"])
    return replaced, dropped, "; ".join(used) or f"compressed-tensors {fmt} (no quantized tensors)"
