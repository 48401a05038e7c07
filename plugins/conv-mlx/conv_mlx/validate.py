"""Checks that an MLX directory's config.json, index and shards agree, as one-line problems."""
from __future__ import annotations

from pathlib import Path

from convcore import ConvcoreError, inside_model, read_header, read_json

from .reader import logical_shape, quant_params


def validate_mlx(path: Path) -> list[str]:
    """Problems with the MLX dir ``path`` (empty when valid): config, index vs shards,
    and for every quantized module u32 codes + scales + biases whose widths fit the
    bits and group size config.json gives it."""
    problems: list[str] = []
    # as loading does: nothing a link leads to outside the folder is read
    outside = []
    for file in sorted(p for p in path.iterdir() if p.name.endswith((".json", ".safetensors"))):
        try:
            inside_model(file, path)
        except ConvcoreError as exc:
            outside.append(str(exc))
    if outside:
        return outside
    try:
        config = read_json(path / "config.json")
    except ConvcoreError as exc:
        return [str(exc)]
    if not isinstance(config, dict) or not config.get("model_type"):
        problems.append(f"{path / 'config.json'}: no model_type")
        config = config if isinstance(config, dict) else {}
    if (path / "generation_config.json").is_file():  # read by loading too
        try:
            read_json(path / "generation_config.json")
        except ConvcoreError as exc:
            problems.append(str(exc))

    # shards and index
    index_path = path / "model.safetensors.index.json"
    shards = sorted(p.name for p in path.glob("model*.safetensors"))
    tensors: dict = {}
    where: dict[str, str] = {}
    weight_map: dict = {}
    if index_path.is_file():
        try:
            weight_map = read_json(index_path).get("weight_map") or {}
        except (ConvcoreError, AttributeError) as exc:
            problems.append(str(exc) if isinstance(exc, ConvcoreError) else f"{index_path}: not an object")
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v and Path(v).name == v
                for k, v in weight_map.items()):
            problems.append(f"{index_path}: weight_map is not an object of tensor names to plain shard file names")
            weight_map = {}
        for fname in sorted(set(weight_map.values())):
            if not (path / fname).is_file():
                problems.append(f"{index_path}: names shard {fname!r}, which is missing")
        for fname in shards:
            if fname not in set(weight_map.values()):
                problems.append(f"{path / fname}: shard not in {index_path.name} (mlx-lm would load it anyway)")
    elif not shards:
        problems.append(f"{path}: no model*.safetensors")
    for fname in shards:
        try:
            entries, _ = read_header(path / fname)
        except ConvcoreError as exc:
            problems.append(str(exc))
            continue
        for e in entries:
            if e.name in tensors:
                problems.append(f"{path / fname}: tensor {e.name!r} also in {where[e.name]}")
            tensors[e.name] = e
            where[e.name] = fname
    for name, fname in sorted(weight_map.items()):
        if (path / fname).is_file() and where.get(name) != fname:
            problems.append(f"{index_path}: says {name!r} is in {fname}, "
                            f"found {'in ' + where[name] if name in where else 'in no shard'}")
            break
    for name in sorted(set(where) - set(weight_map)) if weight_map else []:
        problems.append(f"{path / where[name]}: tensor {name!r} is not in {index_path.name}")
        break

    # quantization
    try:
        block = config.get("quantization") or config.get("quantization_config")
        if block is not None and not isinstance(block, dict):
            problems.append(f"{path / 'config.json'}: quantization is not an object")
            block = None
        if block and quant_params(config, "", path / "config.json") is None:
            problems.append(f"{path / 'config.json'}: quantization block lacks bits/group_size")
    except ConvcoreError as exc:
        problems.append(str(exc))
        block = None
    packed = 0

    class _Ref:  # what logical_shape reads from a header entry
        def __init__(self, e):
            self.dtype, self.shape = e.dtype, e.shape

    for name, e in tensors.items():
        if name.endswith((".scales", ".biases")):
            stem = name.rsplit(".", 1)[0]
            if f"{stem}.weight" not in tensors:
                problems.append(f"{path / where[name]}: {name} has no {stem}.weight")
            continue
        if not name.endswith(".weight"):
            continue
        stem = name[: -len(".weight")]
        source = str(path / where[name])
        if f"{stem}.scales" not in tensors:
            if e.dtype == "u32" and block:
                problems.append(f"{source}: {name} is packed (u32) but {stem}.scales is missing "
                                f"(config.json says the model is quantized)")
            elif e.dtype == "u32":
                problems.append(f"{source}: {name} is u32 but config.json has no quantization block")
            continue
        packed += 1
        biases = tensors.get(f"{stem}.biases")
        try:
            logical_shape(stem, _Ref(e), _Ref(tensors[f"{stem}.scales"]),
                          _Ref(biases) if biases else None, quant_params(config, stem, path / "config.json"), source)
        except ConvcoreError as exc:
            problems.append(str(exc))
    if block and not packed and not any(p.endswith("is missing (config.json says the model is quantized)")
                                        for p in problems):
        problems.append(f"{path / 'config.json'}: quantization block present but no tensor has scales")
    if block:
        modules = {n[: -len(".weight")] for n in tensors if n.endswith(".weight")}
        for key, entry in block.items():
            if isinstance(entry, (dict, bool)) and key not in modules:
                problems.append(f"{path / 'config.json'}: quantization entry {key!r} names no module in the weights")
                break
    return problems
