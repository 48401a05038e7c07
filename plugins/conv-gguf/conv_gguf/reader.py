"""GGUF -> convcore Model: inverse names and transforms, config rebuilt from the keys,
tensors dequantized on demand, tokenizer turned back into HF files."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import gguf
import ml_dtypes
import numpy as np

import convcore
from convcore import ConvcoreError, Model, TensorRef

from . import arch_table, archs, checks, rope
from .shards import shard_paths

T = gguf.GGMLQuantizationType
FLOAT_VIEWS = {T.F32: ("f32", np.float32), T.F16: ("f16", np.float16),
               T.BF16: ("bf16", ml_dtypes.bfloat16)}


@dataclass(frozen=True)
class _Tensor:
    """A tensor's place in a GGUF file, from our own bounds-checked header walk (gguf-py's
    reader takes seconds to build its per-field views of a 32k-token vocabulary)."""

    name: str
    tensor_type: int
    shape: tuple[int, ...]      # ggml order, as gguf-py gives it
    data_offset: int            # from the start of the file
    n_bytes: int


def _open(paths: list[Path]) -> tuple[dict[str, Any], list[tuple[_Tensor, None, Path]]]:
    kv: dict[str, Any] = {}
    tensors = []
    seen: dict[str, Path] = {}
    for i, p in enumerate(paths):
        header = checks.read_header(p, keep_arrays=True)
        problem = checks.split_problem(p, i, len(paths), header.kv)
        if problem:
            raise ConvcoreError(problem)
        for key, value in header.kv.items():
            kv.setdefault(key, value)
        for t in header.tensors:
            if t.name in seen:
                raise ConvcoreError(f"{p}: tensor {t.name!r} is also in {seen[t.name].name}")
            seen[t.name] = p
        tensors.extend((_Tensor(t.name, t.gtype, tuple(reversed(t.shape)),
                                header.data_start + t.offset, t.nbytes), None, p)
                       for t in header.tensors)
    return kv, tensors


def rebuild_config(kv: dict[str, Any], spec: archs.Arch, tied: bool,
                   extra: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """An HF config.json dict from the GGUF hyper-parameters (and the rope tensors,
    ``extra``, that llama.cpp keeps as tensors: ``rope_freqs``)."""
    a = spec.gguf_arch
    config: dict[str, Any] = {"architectures": [spec.hf_class], "model_type": spec.model_type,
                              "dtype": "float32", **spec.config_defaults}
    for key, _, _, hf_key in spec.hparams:
        if hf_key and f"{a}.{key}" in kv:
            config[hf_key] = kv[f"{a}.{key}"]
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in kv:
        config["vocab_size"] = len(kv["tokenizer.ggml.tokens"])
    if spec.encoder:
        # no rope, no generation: BERT-style config keys only; [CLS]/[SEP] are the GGUF's
        # BOS/EOS but not a BertConfig's
        if spec.read_config is not None:
            spec.read_config(kv, config)
        if "tokenizer.ggml.padding_token_id" in kv:
            config["pad_token_id"] = int(kv["tokenizer.ggml.padding_token_id"])
        config["tie_word_embeddings"] = tied
        if "general.name" in kv:
            config["_name_or_path"] = kv["general.name"]
        return config
    heads = config.get("num_attention_heads")
    if heads and "hidden_size" in config:
        config.setdefault("head_dim", config["hidden_size"] // heads)
    config["rope_parameters"] = rope.read(kv, a, extra or {}, int(config.get("head_dim") or 0))
    rot = kv.get(f"{a}.rope.dimension_count")
    if rot and config.get("head_dim") and rot != config["head_dim"]:
        config["rope_parameters"]["partial_rotary_factor"] = rot / config["head_dim"]
    if spec.read_config is not None:
        spec.read_config(kv, config)
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("padding_token_id", "pad_token_id")):
        if f"tokenizer.ggml.{key}" in kv:
            config[hf_key] = int(kv[f"tokenizer.ggml.{key}"])
    config["tie_word_embeddings"] = tied
    if "general.name" in kv:
        config["_name_or_path"] = kv["general.name"]
    return config


def _dequantizer(registry: Any, gtype: Any):
    """``dequantize(blocks, shape) -> f32``: the registered scheme of that name where one
    is installed (compiled kernels, equal to gguf-py bit for bit), else gguf-py's numpy."""
    scheme = registry.schemes.get(gtype.name.lower())
    if scheme is not None:
        return lambda blocks, shape: scheme.dequantize({"blocks": blocks}, shape)
    return lambda blocks, shape: gguf.quants.dequantize(blocks, gtype).astype(np.float32, copy=False)


def _loader(path: Path, t: _Tensor, shape: tuple[int, ...], fn, registry: Any):
    gtype = T(t.tensor_type)
    offset, nbytes = int(t.data_offset), int(t.n_bytes)
    dequantize = None if gtype in FLOAT_VIEWS else _dequantizer(registry, gtype)
    # a scheme that dequantizes straight to f16 (say) serves load_as without the float32
    # tensor; any dequantizer serves load_chunks a block of rows at a time
    scheme = registry.schemes.get(gtype.name.lower())
    direct = scheme.dequantize_to if scheme is not None and dequantize is not None else None

    def loaders(dtype: str):
        """convcore's row-block (load, pieces) of the tensor in ``dtype``: each block of rows
        decoded from a map of just its own blocks (whose pages leave memory with the map)."""
        block, size = gguf.GGML_QUANT_SIZES[gtype]
        row_bytes = shape[-1] // block * size

        def rows(a: int, b: int) -> np.ndarray:
            raw = np.memmap(path, dtype=np.uint8, mode="r", offset=offset + a * row_bytes,
                            shape=((b - a) * row_bytes,)).reshape(b - a, row_bytes)
            if direct is not None and dtype != "f32":
                return direct({"blocks": raw}, (b - a, shape[-1]), dtype)
            return convcore.cast(dequantize(raw, (b - a, shape[-1])), dtype)
        return convcore.row_block_loaders(shape, rows, dtype)

    def load() -> np.ndarray:
        if gtype in FLOAT_VIEWS:
            # a fresh map per read: its pages go with the array, so resident memory stays
            # bounded by the tensors in flight instead of growing to the file's size
            raw = (np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(nbytes,))
                   if nbytes else np.zeros(0, dtype=np.uint8))
            array = raw.view(FLOAT_VIEWS[gtype][1]).reshape(shape)
        else:
            array = loaders("f32")[0]()
        if fn is not None:
            array = fn(array)
            if gtype in FLOAT_VIEWS and array.dtype != FLOAT_VIEWS[gtype][1]:
                array = array.astype(FLOAT_VIEWS[gtype][1])
        return array

    reorder = fn is not None and getattr(fn, "rows_only", False)
    if gtype in FLOAT_VIEWS or (fn is not None and not reorder) or not nbytes:
        # floats are views of the file already; an arithmetic transform (a norm offset)
        # works on the whole float32 tensor
        return load, None, None

    def load_as(dtype: str) -> np.ndarray:
        array = loaders(dtype)[0]()
        return fn(array) if reorder else array  # the q/k row order: rows move, values don't

    def pieces(dtype: str) -> Iterator[np.ndarray]:
        return loaders(dtype)[1](dtype)

    if reorder:  # rows come from all over the tensor: whole, but straight in the asked dtype
        return load, (load_as if direct is not None else None), None
    return load, (load_as if direct is not None else None), pieces


def _expert_refs(path: Path, t: _Tensor, hf_names: list[str], registry: Any) -> dict[str, TensorRef]:
    """One HF tensor per expert of a stacked GGUF tensor, each reading only its own slab."""
    gtype = T(t.tensor_type)
    if len(t.shape) != 3 or t.shape[2] != len(hf_names) or t.n_bytes % len(hf_names):
        raise ConvcoreError(f"{path}: tensor {t.name!r} has shape {list(t.shape)}, expected "
                            f"[cols, rows, {len(hf_names)} experts]")
    if gtype not in FLOAT_VIEWS and gtype not in gguf.quants._type_traits:  # noqa: SLF001
        raise ConvcoreError(f"{path}: tensor {t.name!r} has type {gtype.name}, which gguf "
                            "cannot dequantize")
    slab = t.n_bytes // len(hf_names)
    shape = (int(t.shape[1]), int(t.shape[0]))
    out = {}
    for x, hf in enumerate(hf_names):
        part = _Tensor(t.name, t.tensor_type, t.shape[:2], t.data_offset + x * slab, slab)
        load, cast_load, pieces = _loader(path, part, shape, None, registry)
        out[hf] = TensorRef(hf, shape, FLOAT_VIEWS[gtype][0] if gtype in FLOAT_VIEWS else "f32", load,
                            source=str(path), stored="" if gtype in FLOAT_VIEWS else gtype.name.lower(),
                            stored_nbytes=slab, cast_loader=cast_load, chunk_loader=pieces)
    return out


def _unmapped(path: Path, kv: dict[str, Any], tensors: list, reason: str) -> Model:
    """A GGUF this reader cannot map to HF, described as it is (GGUF tensor names, its
    keys as metadata) so that ``inspect`` shows it; converting it stops with ``reason``."""
    registry = convcore.get_registry()
    refs = {}
    for t, _, p in tensors:
        gtype = T(t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))
        if gtype not in FLOAT_VIEWS and gtype not in gguf.quants._type_traits:  # noqa: SLF001
            continue
        load = _loader(p, t, shape, None, registry)[0]
        refs[t.name] = TensorRef(t.name, shape, FLOAT_VIEWS[gtype][0] if gtype in FLOAT_VIEWS else "f32",
                                 load, source=str(p), stored="" if gtype in FLOAT_VIEWS else gtype.name.lower(),
                                 stored_nbytes=int(t.n_bytes))
    metadata = {k.removeprefix("general."): v for k, v in kv.items()
                if k.startswith("general.") and isinstance(v, (str, int, float, bool))}
    metadata.update(source=str(path), unmapped=reason)
    arch = str(kv.get("general.architecture") or "unknown")
    config = {k.removeprefix(f"{arch}."): v for k, v in kv.items()
              if k.startswith(f"{arch}.") and isinstance(v, (str, int, float, bool))}
    return Model(arch=arch, config={"model_type": arch, **config}, tensors=refs, metadata=metadata,
                 source=str(path), format="gguf")


def load_gguf(path: Path) -> Model:
    """Describe a GGUF file (or split set) as a lazy HF-named :class:`Model`."""
    path = Path(path)
    if not path.is_file():
        raise ConvcoreError(f"{path}: a gguf model is a file")
    kv, tensors = _open(shard_paths(path))
    arch_name = kv.get("general.architecture")
    if kv.get("general.type") == "adapter":
        # an adapter has no hyper-parameters to map its tensors back with: runtimes apply it
        return _unmapped(path, kv, tensors, f"a LoRA adapter for {arch_name} (alpha "
                                            f"{kv.get('adapter.lora.alpha')}); apply it with --lora "
                                            "on infer, compare or serve, or convert its PEFT folder")
    known = arch_table.read_back()
    if arch_name not in known:
        return _unmapped(path, kv, tensors, f"GGUF architecture {arch_name!r} cannot be read back "
                                            f"to HF (supported: {', '.join(known)})")
    spec = known[arch_name]
    if not spec.experts and kv.get(f"{arch_name}.expert_count"):
        # llama.cpp stores some mixtures of experts under the dense architecture (Mixtral
        # is "llama" with expert tensors): read them back as the family that has experts
        moe = [a for a in arch_table.registered().items.values()
               if a.gguf_arch == arch_name and a.experts]
        spec = moe[0] if moe else spec
    names = {t.name for t, _, _ in tensors}
    tied = "output.weight" not in names
    registry = convcore.get_registry()   # captured: tensors may be read from worker threads
    # tensors llama.cpp's converter makes from config settings become settings again
    extra = {t.name: np.array(_loader(p, t, tuple(int(d) for d in reversed(t.shape)), None, registry)[0]())
             for t, _, p in tensors if t.name in rope.TENSORS and T(t.tensor_type) in FLOAT_VIEWS}
    try:
        config = rebuild_config(kv, spec, tied, extra)
    except ConvcoreError as exc:
        raise ConvcoreError(f"{path}: {exc}") from None
    refs: dict[str, TensorRef] = {}
    n_expert = int(kv.get(f"{arch_name}.expert_count") or 0)
    for t, _, p in tensors:
        if t.name in extra:
            continue
        per_expert = archs.unmap_expert(spec, t.name, n_expert) if spec.experts else None
        if per_expert is not None:
            refs.update(_expert_refs(p, t, per_expert, registry))
            continue
        hf = archs.unmap_name(spec, t.name)
        if hf is None:
            known_to_llamacpp = checks.tensor_names(arch_name)
            if known_to_llamacpp is None or not known_to_llamacpp.fullmatch(t.name):
                raise ConvcoreError(f"{p}: tensor {t.name!r} has no HF name for architecture {arch_name}")
            # a tensor llama.cpp knows and this reader does not map: describe the file as is
            return _unmapped(path, kv, tensors, f"tensor {t.name!r} has no HF name for architecture "
                                                f"{arch_name}")
        gtype = T(t.tensor_type)
        if gtype not in FLOAT_VIEWS and gtype not in gguf.quants._type_traits:  # noqa: SLF001
            raise ConvcoreError(f"{p}: tensor {t.name!r} has type {gtype.name}, which gguf "
                                "cannot dequantize")
        shape = tuple(int(d) for d in reversed(t.shape))
        dtype = FLOAT_VIEWS[gtype][0] if gtype in FLOAT_VIEWS else "f32"
        fn = archs.transform(spec, config, t.name, inverse=True)
        if fn is not None and spec.norm_offset and t.name.endswith("norm.weight"):
            dtype = "f32" if gtype == T.F32 else dtype
        load, cast_load, pieces = _loader(p, t, shape, fn, registry)
        refs[hf] = TensorRef(hf, shape, dtype, load, source=str(p),
                             stored="" if gtype in FLOAT_VIEWS else gtype.name.lower(),
                             stored_nbytes=int(t.n_bytes), cast_loader=cast_load,
                             chunk_loader=pieces)
    from .hf_tokenizer import tokenizer_files
    problem = checks.vocab_problem(kv)
    if problem:
        raise ConvcoreError(f"{path}: {problem}")
    tokenizer = tokenizer_files(kv, spec.tokenizer_class)
    if kv.get("tokenizer.ggml.tokens") and not tokenizer:
        print(f"warning: {path}: tokenizer.ggml.model {kv.get('tokenizer.ggml.model')!r} has no HF "
              "tokenizer this reader can rebuild; the model is read without one", file=sys.stderr)
    metadata = {k.removeprefix("general."): v for k, v in kv.items()
                if k.startswith("general.") and isinstance(v, (str, int, float, bool))}
    metadata["source"] = str(path)
    model = Model(arch=spec.model_type, config=config, tensors=refs, tokenizer=tokenizer,
                  metadata=metadata, source=str(path), format="gguf")
    pooling = kv.get(f"{arch_name}.pooling_type")
    modes = {v: k for k, v in archs.POOLING_TYPES.items() if k in ("mean", "cls", "last")}
    if spec.encoder and pooling in modes and isinstance(getattr(model, "companions", None), dict):
        # the pooling the GGUF records, as the sentence-transformers files that say it
        from .companions import sentence_transformers_files
        model.companions.update(sentence_transformers_files(modes[pooling], int(config["hidden_size"])))
    return model
