"""HF model -> MLX directory, laid out as ``mlx_lm.convert`` writes it.

Every tensor's name, dtype and (packed) shape is planned from the lazy model before any
data is read, then tensors are pulled, cast, quantized and written one at a time
(``jobs`` threads work ahead, in order, within a byte budget), so memory holds about
one large tensor plus a few small ones.
"""
from __future__ import annotations

import json
import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from convcore import (
    FLOAT_DTYPES, ConvcoreError, Model, PlannedTensor, TensorRef, cast, dtype_name, get_registry,
    numpy_dtype, page_releaser, parse_size, quantize, stack_tensors, with_user_metadata, write_companions, write_sharded,
    write_tokenizer_files,
)

from .archs import expert_of, rules_for
from .rope import mlx_keys
from .layout import (
    DTYPE_NAMES, SHARD_BYTES, TORCH_DTYPES, dropped, module_choice, order_key, packed_shapes,
    parse_scheme, quantizable,
)


def output_dtype(model: Model, options: dict[str, Any]) -> str | None:
    """``--dtype``, else what mlx-lm does: cast to config.json's ``torch_dtype`` when present
    (a transformers-5 ``dtype`` key alone is not cast); None keeps each tensor's type."""
    if options.get("dtype"):
        return str(options["dtype"])
    return TORCH_DTYPES.get(str(model.config.get("torch_dtype")))


def plan(model: Model, options: dict[str, Any]) -> tuple[list[tuple[TensorRef, str, tuple[int, int] | None]],
                                                         dict[str, Any], list[str]]:
    """Decide each source tensor's fate: ``[(ref, out_dtype, (bits, group) or None)]``,
    the config's quantization block (None when unquantized) and the names dropped."""
    rules = rules_for(model.arch)
    mlx_keys(model.config, model.arch, model.source)   # refuse a rope mlx-lm cannot run, first
    dtype = output_dtype(model, options)
    quant = options.get("quant")
    default = parse_scheme(quant) if quant else None
    num_layers = int(model.config.get("num_hidden_layers") or 0)
    block: dict[str, Any] | None = None
    if default:
        block = {"group_size": default[1], "bits": default[0], "mode": "affine"}
    items, skipped = [], []
    for ref in stacked_view(model, rules):
        if dropped(ref.name, model.config, rules):
            skipped.append(ref.name)
            continue
        out = dtype if dtype and ref.dtype in FLOAT_DTYPES else ref.dtype
        choice = None
        if default and ref.dtype in FLOAT_DTYPES and quantizable(ref.name, ref.shape, default[1]):
            module = ref.name[: -len(".weight")]
            choice, recorded = module_choice(module, default, options, num_layers)
            own = next((q for suffix, q in rules.module_quant.items() if module.endswith(suffix)), None)
            if own is not None and choice is not None and not options.get("quant_overrides"):
                # the model class's own predicate (mlx-lm's router bits), recorded as
                # mlx-lm records a predicate's dict: without a mode
                choice, recorded = own, False
                block[module] = {"group_size": own[1], "bits": own[0]}
            if choice and ref.shape[-1] % choice[1]:
                raise ConvcoreError(f"mlx: {ref.name} has {ref.shape[-1]} columns, not a multiple "
                                    f"of group size {choice[1]}")
            if choice and recorded:
                block[module] = {"group_size": choice[1], "bits": choice[0], "mode": "affine"}
        items.append((ref, out, choice))
    items.sort(key=lambda item: order_key(item[0].name, rules))  # stable: unknowns keep their order
    return items, block, skipped


def stacked_view(model: Model, rules: Any) -> list[TensorRef]:
    """The model's tensors with each layer's experts stacked as mlx-lm's ``sanitize()``
    stacks them (``switch_mlp.*.weight``: ``(experts, out, in)``), in place of the first
    expert; other tensors as they are. A stack is read whole when written (one stacked
    tensor in memory, never all experts of all layers)."""
    if not rules.experts:
        return list(model.tensors.values())
    groups: dict[str, dict[int, TensorRef]] = {}
    out: list[TensorRef | str] = []
    for ref in model.tensors.values():
        hit = expert_of(rules, ref.name)
        if hit is None:
            out.append(ref)
            continue
        if hit[0] not in groups:
            groups[hit[0]] = {}
            out.append(hit[0])
        groups[hit[0]][hit[1]] = ref
    n = int(model.config.get("num_local_experts") or model.config.get("num_experts") or 0)
    return [item if isinstance(item, TensorRef) else stack_tensors(item, groups[item], n, model.source)
            for item in out]


def write_mlx(model: Model, path: Path, options: dict[str, Any], progress: Callable[[str], None]) -> Path:
    items, block, skipped = plan(model, options)
    # Looked up here: worker threads do not inherit the registry a conversion runs with.
    registry = get_registry()
    for name in skipped:
        progress(name)

    def work(item: tuple[TensorRef, str, tuple[int, int] | None]) -> Any:
        ref, out, choice = item
        if choice is None:
            return {ref.name: cast_rows(ref.load(), out)}
        scheme = f"int{choice[0]}-g{choice[1]}"
        parts = ref.parts
        if parts:   # a stack of experts, quantized an expert at a time (groups run along rows)
            each = [quantize_rows(p.load(), out, scheme, ref.name, registry) for p in parts]
            data = {key: np.stack([e[key] for e in each]) for key in each[0]}
            del each
        else:
            data = quantize_rows(ref.load(), out, scheme, ref.name, registry)
        stem = ref.name[: -len(".weight")]
        return {f"{stem}.{part}": data[part] for part in ("weight", "scales", "biases")}

    # a large tensor that stays float is cast a flat chunk at a time as the writer takes
    # it (never whole, its source pages dropped behind it); the rest are made ahead
    streamed = {ref.name for ref, out, choice in items
                if choice is None and math.prod(ref.shape) * numpy_dtype(out).itemsize >= STREAM_BYTES}
    # likewise a large quantized one (not a stack of experts): its packed weight is
    # written a block of rows at a time as they are quantized, its scales and biases
    # (a fraction of it) kept from that pass and written after it
    quant_streams = {ref.name: QuantizedStream(ref, out, f"int{choice[0]}-g{choice[1]}", registry)
                     for ref, out, choice in items
                     if choice is not None and not ref.parts
                     and math.prod(ref.shape) * choice[0] // 8 >= STREAM_BYTES}
    made = [item for item in items if item[0].name not in streamed and item[0].name not in quant_streams]
    sizes = [ref.nbytes + math.prod(ref.shape) * numpy_dtype(out).itemsize for ref, out, _ in made]
    results = prefetch(work, made, sizes, int(options.get("jobs") or 1), PREFETCH_BYTES)
    pending: dict[str, np.ndarray] = {}

    def take(name: str) -> np.ndarray:
        if name not in pending:
            pending.update(next(results))
        return pending.pop(name)

    planned: list[PlannedTensor] = []
    last_part: dict[str, str] = {}
    params = 0
    for ref, out, choice in items:
        params += math.prod(ref.shape)
        if ref.name in streamed:
            planned.append(PlannedTensor(ref.name, out, ref.shape, lambda r=ref, o=out: cast_stream(r, o)))
            last_part[ref.name] = ref.name
            continue
        if choice is None:
            planned.append(PlannedTensor(ref.name, out, ref.shape, lambda n=ref.name: take(n)))
            last_part[ref.name] = ref.name
            continue
        wshape, sshape = packed_shapes(ref.shape, *choice)
        stem = ref.name[: -len(".weight")]
        stream = quant_streams.get(ref.name)
        for part, dt, shape in (("weight", "u32", wshape), ("scales", out, sshape), ("biases", out, sshape)):
            if stream is not None:
                make = stream.codes if part == "weight" else (lambda k=part, st=stream: st.take(k))
            else:
                make = (lambda n=f"{stem}.{part}": take(n))
            planned.append(PlannedTensor(f"{stem}.{part}", dt, shape, make))
        last_part[f"{stem}.biases"] = ref.name

    def written(t: PlannedTensor) -> None:
        if t.name in last_part:
            progress(last_part[t.name])

    max_shard = parse_size(options.get("split_max_size") or SHARD_BYTES)
    if options.get("dry_run"):
        for t in planned:
            print(f"{t.name} {t.dtype}{list(t.shape)}")
        return path
    path.mkdir(parents=True, exist_ok=True)
    write_sharded(path, planned, max_shard_size=max_shard,
                  metadata=with_user_metadata({"format": "mlx"}, options.get("metadata"), "mlx"),
                  always_index=True, on_written=written)
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["metadata"]["total_parameters"] = params
    index_path.write_text(json.dumps(index, indent=4))
    write_config(path, model, block, output_dtype(model, options))
    write_tokenizer_files(path, model)
    write_companions(path, model)
    return path


PREFETCH_BYTES = 96 << 20
STREAM_BYTES = 32 << 20   # float outputs this large are written as they are cast
CHUNK_ELEMENTS = 1 << 22


def cast_stream(ref: TensorRef, dtype: str, chunk: int = CHUNK_ELEMENTS) -> Iterator[np.ndarray]:
    """``ref`` cast to ``dtype`` as flat C-order chunks (what ``cast_rows`` gives, a piece
    at a time); the source's mapped pages leave the resident set once a chunk is cast."""
    for part in ref.parts or (ref,):   # a stack of experts: one at a time
        flat = np.ascontiguousarray(part.load()).reshape(-1)
        release = page_releaser(flat)
        for start in range(0, flat.size, chunk):
            piece = flat[start:start + chunk]
            yield cast(piece, dtype)
            release(piece)


def prefetch(fn: Callable[[Any], Any], items: list, sizes: list[int], jobs: int, budget: int) -> Iterator[Any]:
    """``map(fn, items)`` in order on ``jobs`` threads, computing ahead only while the
    tensors in flight (source + result bytes) stay under ``budget``, so casting and
    quantizing overlap the writes without holding more than one large tensor ahead."""
    if jobs <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        pending: deque = deque()
        in_flight = 0
        for item, size in zip(items, sizes):
            while pending and (len(pending) > jobs or in_flight + size > budget):
                future, done = pending.popleft()
                in_flight -= done
                yield future.result()
            pending.append((pool.submit(fn, item), size))
            in_flight += size
        while pending:
            yield pending.popleft()[0].result()


def cast_rows(array: np.ndarray, dtype: str, chunk_bytes: int = 16 << 20) -> np.ndarray:
    """``cast`` in row blocks, so a bf16 -> f16 cast of an embedding does not hold a
    whole-tensor f32 intermediate (convcore.cast goes through f32 for bf16)."""
    src = dtype_name(array.dtype)
    if src == dtype or array.ndim < 2:
        return cast(array, dtype)
    if {src, dtype} <= {"f16", "bf16", "f32"} and "f32" not in (src, dtype):
        # ml_dtypes converts f16 <-> bf16 through the exact float value: one rounding, the
        # same result as convcore.cast's route through f32, without the f32 copy.
        return array.astype(numpy_dtype(dtype))
    out = np.empty(array.shape, numpy_dtype(dtype))
    rows = max(1, chunk_bytes // max(1, array[0].size * 4))
    for i in range(0, array.shape[0], rows):
        out[i:i + rows] = cast(array[i:i + rows], dtype)
    return out


def quantize_rows(array: np.ndarray, dtype: str, scheme: str, name: str, registry: Any,
                  chunk_bytes: int = 32 << 20) -> dict[str, np.ndarray]:
    """Cast and quantize ``array`` in row blocks (affine groups run along a row, so the
    result is the same as one call) into preallocated outputs: a large embedding never
    exists whole as f32 or as a cast copy, and the source's pages each block has been
    read from leave the resident set as it goes."""
    rows = max(1, chunk_bytes // max(1, array[0].size * 4))
    if array.shape[0] <= rows:
        return quantize(cast_rows(array, dtype), scheme, {"name": name}, registry=registry).data
    release = page_releaser(array)
    out: dict[str, np.ndarray] = {}
    for i in range(0, array.shape[0], rows):
        part = quantize(cast_rows(array[i:i + rows], dtype), scheme, {"name": name}, registry=registry).data
        release(array[i:i + rows])
        for key, value in part.items():
            if key not in out:
                out[key] = np.empty((array.shape[0], *value.shape[1:]), value.dtype)
            out[key][i:i + rows] = value
    return out


class QuantizedStream:
    """A quantized tensor made as the writer takes it: :meth:`codes` yields the packed
    weight a block of rows at a time (as :func:`quantize_rows` makes them: the same
    bytes), keeping each block's scales and biases, which :meth:`take` then hands over
    (the writer takes them after the weight, as they are planned after it)."""

    def __init__(self, ref: TensorRef, dtype: str, scheme: str, registry: Any,
                 chunk_bytes: int = 32 << 20):
        self.ref, self.dtype, self.scheme, self.registry = ref, dtype, scheme, registry
        self.chunk_bytes = chunk_bytes
        self.rest: dict[str, np.ndarray] = {}

    def codes(self) -> Iterator[np.ndarray]:
        array = self.ref.load()
        rows = max(1, self.chunk_bytes // max(1, array[0].size * 4))
        release = page_releaser(array)
        for i in range(0, array.shape[0], rows):
            part = quantize(cast_rows(array[i:i + rows], self.dtype), self.scheme, {"name": self.ref.name},
                            registry=self.registry).data
            release(array[i:i + rows])
            for key in ("scales", "biases"):
                value = part[key]
                if key not in self.rest:
                    self.rest[key] = np.empty((array.shape[0], *value.shape[1:]), value.dtype)
                self.rest[key][i:i + rows] = value
            yield np.ascontiguousarray(part["weight"]).reshape(-1)

    def take(self, key: str) -> np.ndarray:
        if key not in self.rest:
            raise ConvcoreError(f"{self.ref.name}: {key} asked for before the weight was written")
        return self.rest.pop(key)


def write_config(path: Path, model: Model, block: dict[str, Any] | None, dtype: str | None) -> None:
    """config.json as mlx-lm saves it: the HF config, ``eos_token_id`` from
    generation_config.json, no ``_name_or_path``, keys sorted, the quantization block
    twice (``quantization`` and ``quantization_config``)."""
    config = dict(model.config)
    config.update(mlx_keys(model.config, model.arch, model.source))
    n_expert = config.get("num_experts") or config.get("num_local_experts")
    if n_expert:
        # transformers 5 saves Qwen3-MoE's count as num_local_experts; mlx-lm's Qwen
        # classes require num_experts, its Mixtral num_local_experts: say both
        config.setdefault("num_experts", n_expert)
        config.setdefault("num_local_experts", n_expert)
    config.pop("_name_or_path", None)
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    gen = model.metadata.get("generation_config") or {}
    if isinstance(gen, dict) and gen.get("eos_token_id"):
        config["eos_token_id"] = gen["eos_token_id"]
    if dtype:
        # Unlike mlx-lm (which leaves the key stale), say what the weights now are.
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = DTYPE_NAMES[dtype]
    if block:
        config["quantization"] = block
        config["quantization_config"] = block
    config = _encode_nonfinite(dict(sorted(config.items())))
    (path / "config.json").write_text(json.dumps(config, indent=4))


def _encode_nonfinite(obj: Any) -> Any:
    """Tag inf/nan floats the way transformers does, so config.json stays valid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")}
    if isinstance(obj, dict):
        return {k: _encode_nonfinite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode_nonfinite(v) for v in obj]
    return obj
