"""LoRA adapters: PEFT and mlx-lm adapter folders as models, and merging them into a base
as its tensors stream.

An adapter is a :class:`Model` whose ``metadata["adapter"]`` describes it (see
:func:`adapter_info`) and whose tensors are, for each adapted weight ``W`` of the base
(by its HF name ``N``, e.g. ``model.layers.0.self_attn.q_proj.weight``):

- ``N.lora_a`` of shape ``(r, in)`` and ``N.lora_b`` of shape ``(out, r)``, so that the
  adapted weight is ``W + scale * lora_b @ lora_a``, with ``scale`` per weight in
  ``metadata["adapter"]["scales"][N]`` (PEFT's ``alpha / r``, ``alpha / sqrt(r)`` for
  rsLoRA, ``rank_pattern`` / ``alpha_pattern`` applied; mlx-lm's ``scale``);
- ``N`` itself for a weight the adapter replaces whole (PEFT's ``modules_to_save``).

The adapter's ``arch`` and ``config`` are its base's, so writers know the architecture.
"""
from __future__ import annotations

import itertools
import math
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .hub import is_hub_id, resolve
from .model import ConvcoreError, Model, TensorRef, cast, page_releaser
from .rowblocks import row_block_loaders

PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MLX_WEIGHTS = "adapters.safetensors"
_PEFT_PREFIX = "base_model.model."
_PEFT_KINDS = {"lora_A": "lora_a", "lora_B": "lora_b",
               "lora_embedding_A": "embedding_a", "lora_embedding_B": "embedding_b"}


def detect_peft(path: Path) -> int:
    """20 for a PEFT adapter folder (adapter_config.json and adapter_model.*)."""
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return 20 if any((path / w).is_file() for w in PEFT_WEIGHTS) else 3
    return 0


def detect_mlx_adapter(path: Path) -> int:
    """20 for an mlx-lm adapter folder (adapter_config.json and adapters.safetensors)."""
    if path.is_dir() and (path / "adapter_config.json").is_file() and (path / MLX_WEIGHTS).is_file():
        return 20
    return 0


def adapter_info(model: Model) -> dict[str, Any] | None:
    """The adapter description of ``model`` (None for a plain model): ``type`` ("lora"),
    ``alpha``, ``rank`` (the largest), ``scales`` (HF weight name -> scale), ``replaced``
    (HF names of whole weights), ``base`` (the base's path) and ``source_format``."""
    return model.metadata.get("adapter")


def lora_pairs(model: Model) -> list[tuple[str, TensorRef, TensorRef, float]]:
    """``(weight name, lora_a, lora_b, scale)`` for each weight an adapter changes, in order;
    the adapted weight is ``W + scale * lora_b @ lora_a``."""
    info = adapter_info(model) or {"scales": {}}
    return [(w, model.tensors[f"{w}.lora_a"], model.tensors[f"{w}.lora_b"], float(s))
            for w, s in info["scales"].items()]


def _read_config(path: Path) -> dict[str, Any]:
    from .builtins.hf import read_json

    file = path / "adapter_config.json"
    config = read_json(file)
    if not isinstance(config, dict):
        raise ConvcoreError(f"{file}: not a JSON object")
    return config


def base_for(path: Path, given: str | Path | None) -> Path:
    """The base model folder of the adapter at ``path``: ``given`` (``--base``), else the
    adapter config's ``base_model_name_or_path`` (PEFT) or ``model`` (mlx-lm) when it is
    a local path."""
    if given:
        base = resolve(given)
        if not base.exists():
            raise ConvcoreError(f"{base}: no such file or directory (the base model for {path})")
        return base
    config = _read_config(path)
    named = config.get("base_model_name_or_path") or config.get("model")
    if named and (Path(str(named)).exists() or is_hub_id(str(named))):
        return resolve(str(named))
    said = f"its config names {named!r}, neither a local folder nor a hub id" if named else "its config names none"
    raise ConvcoreError(f"{path}: a LoRA adapter needs its base model; {said}: pass --base BASE")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's per-module override: the first pattern matching the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
            return value
    return default


def _open(path: Path) -> dict[str, TensorRef]:
    from .builtins.hf import _bin_tensors
    from .safetensors_io import open_tensors

    if path.suffix == ".bin":
        return _bin_tensors([path])
    return open_tensors(path)[0]


def _transposed(ref: TensorRef, name: str) -> TensorRef:
    return TensorRef(name, tuple(reversed(ref.shape)), ref.dtype,
                     lambda: np.ascontiguousarray(ref.load().T), source=ref.source)


def read_peft(path: Path, base: Model) -> Model:
    """A PEFT LoRA folder over ``base`` (which gives its names, shapes and config)."""
    config = _read_config(path)
    where = path / "adapter_config.json"
    peft_type = str(config.get("peft_type") or "LORA").upper()
    if peft_type != "LORA":
        raise ConvcoreError(f"{where}: peft_type {config.get('peft_type')!r}: only LoRA adapters convert")
    if config.get("use_dora"):
        raise ConvcoreError(f"{where}: a DoRA adapter (use_dora) is not supported; only plain LoRA")
    if config.get("lora_bias"):
        raise ConvcoreError(f"{where}: lora_bias adapters are not supported")
    if config.get("fan_in_fan_out"):   # GPT-2's Conv1D layers: (in, out) weights, B·A transposed
        raise ConvcoreError(f"{where}: fan_in_fan_out adapters (Conv1D layers) are not supported")
    if config.get("layer_replication"):
        raise ConvcoreError(f"{where}: layer_replication adapters are not supported")
    file = next((path / w for w in PEFT_WEIGHTS if (path / w).is_file()), None)
    if file is None:
        raise ConvcoreError(f"{path}: no adapter_model.safetensors or adapter_model.bin")
    alpha = float(config.get("lora_alpha") or config.get("r") or 8)
    rslora = bool(config.get("use_rslora"))
    pairs: dict[str, dict[str, TensorRef]] = {}
    whole: dict[str, TensorRef] = {}
    for key, ref in _open(file).items():
        name = key.removeprefix(_PEFT_PREFIX)
        hit = re.fullmatch(r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.default)?(?:\.weight)?", name)
        if hit is not None:
            pairs.setdefault(hit.group(1), {})[_PEFT_KINDS[hit.group(2)]] = ref
            continue
        saved = re.fullmatch(r"(.+?)(?:\.modules_to_save\.default)?\.(weight|bias)", name)
        if saved is not None and ".lora_" not in name:
            target = f"{saved.group(1)}.{saved.group(2)}"
            whole[target] = ref.with_loader(ref.load, name=target)
            continue
        raise ConvcoreError(f"{file}: tensor {key!r} is neither a LoRA A/B matrix nor a saved module")
    tensors: dict[str, TensorRef] = {}
    scales: dict[str, float] = {}
    ranks = []
    for module, found in pairs.items():
        weight = f"{module}.weight"
        if "embedding_a" in found or "embedding_b" in found:
            # PEFT's embedding LoRA: delta = (B @ A).T with A (r, vocab), B (dim, r)
            if set(found) != {"embedding_a", "embedding_b"}:
                raise ConvcoreError(f"{file}: {module} has only one of lora_embedding_A / lora_embedding_B")
            a = _transposed(found["embedding_b"], f"{weight}.lora_a")
            b = _transposed(found["embedding_a"], f"{weight}.lora_b")
        else:
            if set(found) != {"lora_a", "lora_b"}:
                raise ConvcoreError(f"{file}: {module} has only one of lora_A / lora_B")
            a, b = found["lora_a"], found["lora_b"]
        rank = int(a.shape[0])
        module_alpha = float(_pattern_value(config.get("alpha_pattern"), module, alpha))
        scales[weight] = module_alpha / (math.sqrt(rank) if rslora else rank)
        ranks.append(rank)
        tensors[f"{weight}.lora_a"] = a.with_loader(a.load, name=f"{weight}.lora_a")
        tensors[f"{weight}.lora_b"] = b.with_loader(b.load, name=f"{weight}.lora_b")
    tensors.update(whole)
    info = {"type": "lora", "alpha": alpha, "rank": max(ranks, default=0), "scales": scales,
            "replaced": sorted(whole), "rslora": rslora, "base": base.source, "source_format": "peft",
            "patterns": bool(config.get("rank_pattern") or config.get("alpha_pattern"))}
    return _checked(path, base, tensors, info)


def read_mlx_adapter(path: Path, base: Model) -> Model:
    """An mlx-lm adapter folder (``adapters.safetensors``: ``<module>.lora_a`` of shape
    (in, r) and ``.lora_b`` (r, out), scaled by ``lora_parameters.scale``)."""
    config = _read_config(path)
    where = path / "adapter_config.json"
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise ConvcoreError(f"{where}: fine_tune_type {kind!r}: only LoRA adapters convert")
    params = config.get("lora_parameters") or {}
    if "scale" not in params or "rank" not in params:
        raise ConvcoreError(f"{where}: lora_parameters needs rank and scale")
    scale = float(params["scale"])
    pairs: dict[str, dict[str, TensorRef]] = {}
    for key, ref in _open(path / MLX_WEIGHTS).items():
        hit = re.fullmatch(r"(.+)\.(lora_a|lora_b)", key)
        if hit is None:
            raise ConvcoreError(f"{path / MLX_WEIGHTS}: tensor {key!r} is not a lora_a / lora_b matrix")
        pairs.setdefault(hit.group(1), {})[hit.group(2)] = ref
    tensors: dict[str, TensorRef] = {}
    scales: dict[str, float] = {}
    for module, found in pairs.items():
        if set(found) != {"lora_a", "lora_b"}:
            raise ConvcoreError(f"{path / MLX_WEIGHTS}: {module} has only one of lora_a / lora_b")
        weight = f"{module}.weight"
        tensors[f"{weight}.lora_a"] = _transposed(found["lora_a"], f"{weight}.lora_a")
        tensors[f"{weight}.lora_b"] = _transposed(found["lora_b"], f"{weight}.lora_b")
        scales[weight] = scale
    rank = int(params["rank"])
    info = {"type": "lora", "alpha": scale * rank, "rank": rank, "scales": scales, "replaced": [],
            "rslora": False, "base": base.source, "source_format": "mlx-adapter", "patterns": False}
    return _checked(path, base, tensors, info)


def _checked(path: Path, base: Model, tensors: dict[str, TensorRef], info: dict[str, Any]) -> Model:
    """The adapter model, after checking every matrix against the base's weight."""
    for weight in info["scales"]:
        target = base.tensors.get(weight)
        if target is None:
            raise ConvcoreError(f"{path}: the adapter changes {weight}, which the base "
                                f"{base.source} does not have (wrong base model?)")
        a, b = tensors[f"{weight}.lora_a"], tensors[f"{weight}.lora_b"]
        if len(target.shape) != 2 or len(a.shape) != 2 or len(b.shape) != 2 or \
                a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != tuple(target.shape):
            raise ConvcoreError(f"{path}: {weight}: lora_B {list(b.shape)} x lora_A {list(a.shape)} does "
                                f"not fit the base's {list(target.shape)} (wrong base model?)")
    for weight in info["replaced"]:
        target = base.tensors.get(weight)
        if target is None or tuple(target.shape) != tuple(tensors[weight].shape):
            have = "missing" if target is None else str(list(target.shape))
            raise ConvcoreError(f"{path}: saved module {weight} {list(tensors[weight].shape)} does not "
                                f"fit the base ({have})")
    if not info["scales"] and not info["replaced"]:
        raise ConvcoreError(f"{path}: the adapter holds no LoRA matrices")
    return Model(arch=base.arch, config=dict(base.config), tensors=tensors, tokenizer={},
                 metadata={"adapter": info, "name": path.resolve().name}, source=str(path))


def parse_lora(spec: str) -> tuple[Path, float]:
    """``ADAPTER[:SCALE]`` (``--lora``) as (path, scale)."""
    path, _, scale = spec.rpartition(":") if re.search(r":[-+0-9.eE]+$", spec) else (spec, "", "")
    if not scale:
        return Path(spec), 1.0
    try:
        return Path(path), float(scale)
    except ValueError:
        raise ConvcoreError(f"--lora {spec}: the scale after ':' is not a number") from None


def merged_model(base: Model, adapters: list[tuple[Model, float]]) -> Model:
    """``base`` with each adapter merged into its weights as they are read:
    ``W + scale * lora_b @ lora_a`` computed in float32 a block of rows at a time and
    rounded once to ``W``'s type; a saved module replaces its weight."""
    deltas: dict[str, list[tuple[TensorRef, TensorRef, float]]] = {}
    tensors = dict(base.tensors)
    for adapter, strength in adapters:
        info = adapter_info(adapter)
        for weight, scale in info["scales"].items():
            deltas.setdefault(weight, []).append((adapter.tensors[f"{weight}.lora_a"],
                                                  adapter.tensors[f"{weight}.lora_b"], strength * scale))
        for weight in info["replaced"]:
            ref = adapter.tensors[weight]
            tensors[weight] = ref.with_loader((lambda r=ref, d=base.tensors[weight].dtype: cast(r.load(), d)),
                                              dtype=base.tensors[weight].dtype)
            deltas.pop(weight, None)
    for weight, terms in deltas.items():
        tensors[weight] = _merged_ref(base.tensors[weight], terms)
    return Model(arch=base.arch, config=base.config, tensors=tensors, tokenizer=base.tokenizer,
                 metadata={**base.metadata, "loras": [a.source for a, _ in adapters]},
                 source=base.source, format=base.format, companions=base.companions)


#: merged tensors most recently loaded whole, kept for writers that load a tensor once per
#: slice of its rows (the gguf writer does): a few tensors at most, as a plain conversion holds
_RECENT: "OrderedDict[int, np.ndarray]" = OrderedDict()
_RECENT_SIZE = 3
_RECENT_LOCK = threading.Lock()
_KEYS = itertools.count()


def _merged_ref(ref: TensorRef, terms: list[tuple[TensorRef, TensorRef, float]]) -> TensorRef:
    local = threading.local()   # one pass's arrays per thread: passes may run side by side

    def prepare() -> None:
        local.w = ref.load()
        local.release = page_releaser(np.asarray(local.w))
        local.terms = [(cast(np.asarray(a.load()), "f32"), cast(np.asarray(b.load()), "f32"), np.float32(s))
                       for a, b, s in terms]

    def rows(start: int, stop: int) -> np.ndarray:
        piece = np.asarray(local.w[start:stop])
        block = np.array(cast(piece, "f32"), dtype=np.float32, copy=True)
        local.release(piece)   # the source's pages, read, leave this process's memory
        for a, b, scale in local.terms:
            delta = b[start:stop] @ a
            delta *= scale
            block += delta
        return cast(block, ref.dtype)

    whole, pieces = row_block_loaders(tuple(ref.shape), rows, ref.dtype, prepare)
    lock = threading.Lock()
    key = next(_KEYS)   # never reused, unlike an id()

    def load() -> np.ndarray:
        with lock:   # a second caller waits for the first's result instead of redoing it
            with _RECENT_LOCK:
                if key in _RECENT:
                    _RECENT.move_to_end(key)
                    return _RECENT[key]
            array = whole()
            with _RECENT_LOCK:
                _RECENT[key] = array
                while len(_RECENT) > _RECENT_SIZE:
                    _RECENT.popitem(last=False)
            return array

    return TensorRef(ref.name, tuple(ref.shape), ref.dtype, load, source=ref.source, chunk_loader=pieces)


def with_loras(model: Model, specs: list[str], load_adapter: Callable[[Path, Model], Model]) -> Model:
    """``model`` with the ``--lora ADAPTER[:SCALE]`` adapters merged (see :func:`merged_model`);
    ``load_adapter(path, base)`` reads one adapter over ``model``."""
    adapters = [(load_adapter(path, model), scale) for path, scale in map(parse_lora, specs)]
    return merged_model(model, adapters) if adapters else model
