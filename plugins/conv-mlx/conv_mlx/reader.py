"""MLX directory -> lazy Model with HF names and an HF config.

Quantized modules (``X.weight`` uint32 + ``X.scales`` + ``X.biases``) become one logical
``X.weight`` in the scales' dtype, dequantized on demand by the registered affine
scheme (``scale * q + bias``, as ``mx.dequantize`` computes).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from convcore import (
    ConvcoreError, Model, TensorRef, arch_of, cast, get_registry, index_shards, inside_model, open_tensors, page_releaser, read_companions, read_json, read_tokenizer_files, row_block_loaders,
)

from .archs import experts_of, registered
from .layout import BITS, GROUP_SIZES, scheme_name


def weight_files(path: Path) -> list[Path]:
    """The shards the index names (each must exist), else ``model*.safetensors``."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return index_shards(index)
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise ConvcoreError(f"{path}: no model*.safetensors")
    return [inside_model(f, path) for f in files]


def quant_params(config: dict[str, Any], module: str,
                 where: str | Path = "mlx config.json") -> tuple[int, int] | None:
    """(bits, group) config.json gives ``module``: its own entry, else the default block;
    None when the config says nothing (or the entry is ``false``)."""
    block = config.get("quantization") or config.get("quantization_config")
    if not isinstance(block, dict):
        return None
    entry = block.get(module, block)
    if entry is False:
        return None
    if not isinstance(entry, dict):
        entry = block
    mode = entry.get("mode", "affine")
    if mode != "affine":
        raise ConvcoreError(f"{where}: module {module!r} uses quantization mode {mode!r}; "
                            "only affine is supported")
    try:
        return int(entry["bits"]), int(entry["group_size"])
    except (KeyError, TypeError, ValueError):
        raise ConvcoreError(f"{where}: quantization entry for {module!r} lacks bits/group_size") from None


def logical_shape(name: str, weight: TensorRef, scales: TensorRef, biases: TensorRef | None,
                  params: tuple[int, int] | None, source: str) -> tuple[tuple[int, ...], int, int]:
    """Float shape, bits and group of a packed module; raises one-line errors naming the
    tensor when the pieces disagree."""
    if params is None:
        raise ConvcoreError(f"{source}: {name}.scales present but config.json has no quantization block")
    bits, group = params
    if bits not in BITS or group not in GROUP_SIZES:
        raise ConvcoreError(f"{source}: {name}: unsupported bits {bits} / group size {group}")
    if biases is None:
        raise ConvcoreError(f"{source}: {name}.biases missing beside {name}.scales")
    if weight.dtype != "u32":
        raise ConvcoreError(f"{source}: {name}.weight is {weight.dtype}, expected u32 (packed {bits}-bit)")
    if biases.shape != scales.shape:
        raise ConvcoreError(f"{source}: {name}.biases shape {list(biases.shape)} differs from "
                            f"scales {list(scales.shape)}")
    *lead, packed = weight.shape
    cols = packed * 32 // bits
    if (packed * 32) % bits or tuple(scales.shape) != (*lead, cols // group) or cols % group:
        raise ConvcoreError(
            f"{source}: {name}.weight packed width {packed} with {bits}-bit codes means {cols} "
            f"columns, but scales {list(scales.shape)} say {scales.shape[-1] * group} "
            f"(group size {group})")
    return (*lead, cols), bits, group


def load_mlx(path: Path) -> Model:
    """Describe the MLX directory ``path`` as a lazy HF-named model."""
    if not path.is_dir():
        raise ConvcoreError(f"{path}: an mlx model is a directory")
    config = read_json(path / "config.json")
    if not isinstance(config, dict):
        raise ConvcoreError(f"{path / 'config.json'}: not a JSON object")
    raw: dict[str, TensorRef] = {}
    for file in weight_files(path):
        refs, _ = open_tensors(file)
        for name, ref in refs.items():
            if name in raw:
                raise ConvcoreError(f"{file}: tensor {name!r} also in {raw[name].source}")
            raw[name] = ref
    raw = _unstacked(raw, config)
    registry = get_registry()  # captured: tensors may be read from worker threads
    tensors: dict[str, TensorRef] = {}
    for name, ref in raw.items():
        if name.endswith((".scales", ".biases")) and name.rsplit(".", 1)[0] + ".weight" in raw:
            continue
        stem = name[: -len(".weight")] if name.endswith(".weight") else None
        scales = raw.get(f"{stem}.scales") if stem else None
        if scales is None:
            if ref.dtype == "u32" and quant_params(config, stem or name, path / "config.json"):
                raise ConvcoreError(f"{ref.source}: {name} is packed (u32) but {stem}.scales is missing")
            tensors[name] = ref
            continue
        shape, bits, group = logical_shape(stem, ref, scales, raw.get(f"{stem}.biases"),
                                           quant_params(config, stem, path / "config.json"), ref.source)
        load, pieces = _dequantizer(registry, ref, scales, raw[f"{stem}.biases"], bits, group, shape)
        tensors[name] = TensorRef(name, shape, scales.dtype, load, source=ref.source,
                                  stored=f"int{bits}-g{group}",
                                  stored_nbytes=ref.nbytes + scales.nbytes + raw[f"{stem}.biases"].nbytes,
                                  chunk_loader=pieces)
    for name, ref in raw.items():
        if name.endswith((".scales", ".biases")) and name.rsplit(".", 1)[0] + ".weight" not in raw:
            raise ConvcoreError(f"{ref.source}: {name} has no {name.rsplit('.', 1)[0]}.weight")
    metadata: dict[str, Any] = {"source": str(path)}
    if (path / "generation_config.json").is_file():
        metadata["generation_config"] = read_json(path / "generation_config.json")
    return Model(arch=arch_of(config), config=hf_config(config), tensors=tensors,
                 tokenizer=read_tokenizer_files(path), metadata=metadata, source=str(path),
                 format="mlx", companions=read_companions(path))


def _unstacked(raw: dict[str, TensorRef], config: dict[str, Any]) -> dict[str, TensorRef]:
    """``raw`` with mlx-lm's stacked experts (``switch_mlp``) split back into HF's
    per-expert tensors, each a view of its own slab (quantized parts included)."""
    rules = registered().items.get(arch_of(config))
    if rules is None or not rules.experts:
        return raw
    n = int(config.get("num_local_experts") or config.get("num_experts") or 0)
    out: dict[str, TensorRef] = {}
    for name, ref in raw.items():
        names = experts_of(rules, name, n)
        if names is None:
            out[name] = ref
            continue
        if len(ref.shape) < 2 or ref.shape[0] != n:
            raise ConvcoreError(f"{ref.source}: {name} has shape {list(ref.shape)}, expected "
                                f"{n} stacked experts first")
        for x, hf in enumerate(names):
            out[hf] = TensorRef(hf, tuple(ref.shape[1:]), ref.dtype, lambda r=ref, x=x: r.load()[x],
                                source=ref.source)
    return out


def _dequantizer(registry: Any, weight: TensorRef, scales: TensorRef, biases: TensorRef, bits: int, group: int,
                 shape: tuple[int, ...]) -> tuple[Callable[[], np.ndarray], Callable[[str], Iterator[np.ndarray]]]:
    """(load, chunk_loader) of a quantized module's logical weight, dequantized a block of
    rows at a time (never a whole-tensor float32 temporary: the 1.1B model's embedding
    would take 262 MB per temporary)."""
    held: dict[str, Any] = {}

    def prepare() -> None:
        held["scheme"] = registry.scheme(scheme_name(bits, group))
        held["q"] = weight.load().reshape(-1, weight.shape[-1])
        held["s"] = scales.load().reshape(-1, scales.shape[-1])
        held["b"] = biases.load().reshape(-1, biases.shape[-1])
        # the mapped pages of the rows done leave the resident set (a 2 GB embedding's codes
        # and scales would otherwise all stay by the end of the pass)
        held["release"] = [(page_releaser(held[k]), held[k]) for k in ("q", "s", "b")]

    def rows(a: int, z: int) -> np.ndarray:
        out = _rows(a, z)
        for release, array in held["release"]:
            release(array[a:z])
        return out

    def _rows(a: int, z: int) -> np.ndarray:
        scheme, q, s, b = held["scheme"], held["q"], held["s"], held["b"]
        shape_ab = (z - a, shape[-1])
        if scales.dtype == "f32":
            return np.asarray(scheme.dequantize({"weight": q[a:z], "scales": s[a:z], "biases": b[a:z]},
                                                shape_ab), dtype=np.float32)
        # mx.dequantize works in the scales' type: scale*q rounds to it, then +bias
        # rounds again. Unpack the codes with the scheme (scale 1, bias 0), repeat that.
        ones = np.ones(s[a:z].shape, np.float32)
        codes = np.asarray(scheme.dequantize({"weight": q[a:z], "scales": ones,
                                              "biases": np.zeros_like(ones)}, shape_ab), np.float32)
        wide_s = np.repeat(cast(s[a:z], "f32"), group, axis=-1)
        product = cast(cast(wide_s * codes, scales.dtype), "f32")
        del wide_s, codes
        return cast(product + np.repeat(cast(b[a:z], "f32"), group, axis=-1), scales.dtype)

    return row_block_loaders(shape, rows, scales.dtype, prepare)


def hf_config(config: dict[str, Any]) -> dict[str, Any]:
    """The HF config an MLX config.json came from: quantization blocks removed."""
    config = json.loads(json.dumps(config))
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    return config
