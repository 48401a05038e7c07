"""LoRA adapter -> the folder mlx-lm loads with ``load(base, adapter_path=DIR)``.

``adapter_config.json`` says ``fine_tune_type: lora``, ``num_layers`` (all of them) and
``lora_parameters`` (``rank``, ``scale``, ``dropout``, ``keys``: the adapted modules of a
layer); ``adapters.safetensors`` holds ``<module>.lora_a`` (in, rank) and ``.lora_b``
(rank, out). mlx-lm has one rank and one scale per adapter: a module of a smaller rank is
padded with zero rows and columns (the product is unchanged) and a module whose scale
differs (rsLoRA, PEFT's ``alpha_pattern``) has the ratio folded into its ``lora_b``.
Modules of a layer the adapter does not change keep mlx-lm's zero ``lora_b``: no effect.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

import convcore
from convcore import ConvcoreError, Model, StreamingWriter, cast

from .archs import rules_for

LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
MERGE_HINT = "merge it instead: convcore run BASE --lora ADAPTER --to mlx"


def write_adapter(model: Model, path: Path, options: dict[str, Any], progress: Callable[[str], None]) -> Path:
    info = convcore.adapter_info(model)
    rules_for(model.arch)   # an architecture conv-mlx (and so mlx-lm) knows, or one line
    if info["replaced"]:
        raise ConvcoreError(f"{model.source}: the adapter replaces whole weights ({', '.join(info['replaced'])}, "
                            f"PEFT's modules_to_save), which an mlx-lm LoRA adapter cannot hold; {MERGE_HINT}")
    if options.get("quant"):
        raise ConvcoreError(f"{model.source}: an mlx-lm adapter is stored in float (--dtype), not {options['quant']}")
    dtype = options.get("dtype") or "f32"
    pairs = convcore.lora_pairs(model)
    rank = max(int(a.shape[0]) for _, a, _, _ in pairs)
    scale = float(pairs[0][3])
    keys = []
    for weight, *_ in pairs:
        hit = LAYER.fullmatch(weight)
        if hit is None:
            raise ConvcoreError(f"{model.source}: the adapter changes {weight}, outside the layers mlx-lm "
                                f"adapts; {MERGE_HINT}")
        keys.append(hit.group(2))
    entries = [(f"{w[:-len('.weight')]}.{k}", dtype, shape) for w, a, b, _ in pairs
               for k, shape in (("lora_a", (a.shape[1], rank)), ("lora_b", (rank, b.shape[0])))]
    config = {"fine_tune_type": "lora", "num_layers": int(model.config.get("num_hidden_layers") or 0),
              "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": sorted(set(keys))}}
    if options.get("dry_run"):
        for name, kind, shape in entries:
            print(f"{name}\t{kind}\t{list(shape)}")
        return path
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    writer = StreamingWriter(path / "adapters.safetensors", entries, {"format": "mlx"})
    try:
        for weight, a_ref, b_ref, own in pairs:
            r = int(a_ref.shape[0])
            a = np.zeros((a_ref.shape[1], rank), np.float32)
            a[:, :r] = cast(np.asarray(a_ref.load()), "f32").T
            b = np.zeros((rank, b_ref.shape[0]), np.float32)
            b[:r] = cast(np.asarray(b_ref.load()), "f32").T * np.float32(own / scale)
            stem = weight[:-len(".weight")]
            writer.write(f"{stem}.lora_a", cast(a, dtype))
            writer.write(f"{stem}.lora_b", cast(b, dtype))
            progress(weight)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def validate_adapter(path: Path) -> list[str]:
    """What mlx-lm's ``load_adapters`` needs: a LoRA config with rank, scale and keys, and
    ``lora_a`` / ``lora_b`` pairs of that rank."""
    try:
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        params = config["lora_parameters"]
        rank = int(params["rank"])
        float(params["scale"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{path / 'adapter_config.json'}: not an mlx-lm LoRA config ({convcore.one_line(exc)})"]
    try:
        entries, _ = convcore.read_header(path / "adapters.safetensors")
    except ConvcoreError as exc:
        return [str(exc)]
    shapes = {e.name: e.shape for e in entries}
    for name, shape in shapes.items():
        stem, _, kind = name.rpartition(".")
        other = f"{stem}.{'lora_b' if kind == 'lora_a' else 'lora_a'}"
        if kind not in ("lora_a", "lora_b") or other not in shapes:
            return [f"{path / 'adapters.safetensors'}: {name} is not half of a lora_a / lora_b pair"]
        if len(shape) != 2 or (shape[1] if kind == "lora_a" else shape[0]) != rank:
            return [f"{path / 'adapters.safetensors'}: {name} {list(shape)} is not of rank {rank}"]
    return []
