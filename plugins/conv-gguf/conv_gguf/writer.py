"""HF model -> GGUF, streaming.

The plan (GGUF name, shape, type of every tensor) is fixed first, so the tensor infos
and offsets are written before any data; then tensors are pulled, transformed and
quantized one at a time (a bounded thread pool keeps the order) and appended.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np

import convcore
from convcore import ConvcoreError, Model, TensorRef, cast, hfconfig, stack_tensors

from . import arch_table, archs, mixes, rope, vocab as vocab_mod
from .companions import companion
from .imatrix import Imatrix, add_imatrix_keys, importance_for, read_imatrix

T = gguf.GGMLQuantizationType
NUMPY_OF = {T.F32: "f32", T.F16: "f16", T.BF16: "bf16"}
IGNORED = re.compile(r"rotary_emb\.inv_freq$")
PHI3_NAME = re.compile(r"phi-?3", re.I)
PHI3_TOKENS = {"<unk>", "<s>", "</s>", "<|endoftext|>"}


def warn(message: str) -> None:
    """A one-line warning on stderr (conversions report fallbacks and guesses)."""
    print(f"warning: {message}", file=sys.stderr)


@dataclass
class Planned:
    name: str                  # GGUF name
    shape: tuple[int, ...]     # logical shape, numpy order
    gtype: T
    ref: TensorRef
    fn: Callable[[np.ndarray], np.ndarray] | None
    # float32 (n_mat, columns): the importance of each column (one row per expert), or None
    importance: np.ndarray | None = None

    @property
    def parts(self) -> tuple[TensorRef, ...]:
        """The experts stacked into this tensor, in order (empty for others)."""
        return self.ref.parts

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.gtype]
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * (self.shape[-1] // block) * size


def flag(options: dict[str, Any], key: str) -> bool:
    """A boolean option, also when it came from the command line as a string."""
    value = options.get(key)
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "no", "off")
    return bool(value)


def _made(name: str, array: np.ndarray, source: str) -> TensorRef:
    """A tensor the conversion makes (no HF tensor behind it), as a TensorRef."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    return TensorRef(name, tuple(array.shape), "f32", lambda: array, source=source)


def float_type(model: Model, options: dict[str, Any]) -> T:
    """Type of the 2-D tensors that stay float: --dtype, else the source's precision."""
    dtype = options.get("dtype")
    if dtype:
        return {"f32": T.F32, "f16": T.F16, "bf16": T.BF16}[dtype]
    dtypes = {t.dtype for t in model.tensors.values() if len(t.shape) >= 2}
    if dtypes == {"f16"}:
        return T.F16
    if dtypes == {"bf16"}:
        return T.BF16
    return T.F32


def plan(model: Model, options: dict[str, Any], imatrix: Imatrix | None = None
         ) -> tuple[archs.Arch, list[Planned], list[str]]:
    """(arch, tensors to write in order, fallback notes); ``imatrix`` (read from
    ``options["imatrix"]`` by the caller) guides the quantized types."""
    spec = arch_table.arch_for(model.arch, model.source)
    config = {**spec.config_defaults, **model.config}
    tied = bool(config.get("tie_word_embeddings", False))
    if not spec.encoder:
        rope.check(config, model.source)
    if spec.swa_pattern and spec.gguf_arch == "gemma3":
        local = hfconfig.rope_parameters(config, "sliding_attention", spec.model_type)
        if local["rope_type"] != "default":
            raise ConvcoreError(f"{model.source}: the sliding layers' rope type {local['rope_type']!r} "
                                "cannot be stored in a GGUF (llama.cpp gives them a base only)")
    named: list[tuple[int, str, TensorRef]] = []
    if spec.encoder and config.get("position_embedding_type", "absolute") != "absolute":
        raise ConvcoreError(f"{model.source}: position_embedding_type "
                            f"{config['position_embedding_type']!r} is not supported by llama.cpp's "
                            f"{spec.gguf_arch} (absolute only)")
    if spec.problem is not None and spec.problem(config):
        raise ConvcoreError(f"{model.source}: llama.cpp's {spec.gguf_arch} cannot run this "
                            f"{spec.model_type} model: {spec.problem(config)}")
    experts: dict[str, dict[int, TensorRef]] = {}
    last: dict[int, int] = {}    # layer -> index of its last expert tensor
    for i, ref in enumerate(model.tensors.values()):
        if IGNORED.search(ref.name) or (tied and ref.name == "lm_head.weight") or spec.drops(ref.name):
            continue
        hit = archs.map_expert(spec, ref.name) if spec.experts else None
        if hit is not None:
            experts.setdefault(hit[0], {})[hit[1]] = ref
            layer = int(hit[0].split(".")[1])
            last[layer] = max(last.get(layer, -1), i)
            continue
        name = archs.map_name(spec, ref.name)
        if name is None:
            raise ConvcoreError(f"{ref.source or model.source}: tensor {ref.name!r} has no GGUF "
                                f"name for architecture {spec.model_type}")
        named.append((i, name, ref))
    n_expert = int(archs._experts(config) or 0)
    stacked = {name: stack_tensors(name, found, n_expert, model.source) for name, found in experts.items()}
    order = {gg: k for k, gg in enumerate(spec.experts.values())}
    for name, ref in stacked.items():
        # llama.cpp's converter writes a layer's stacks once it has seen all its experts
        layer = int(name.split(".")[1])
        generic = re.sub(r"^blk\.\d+\.", "blk.{bid}.", name).removesuffix(".weight")
        named.append((last[layer] + 0.1 * (1 + order[generic]), name, ref))
    for name, array in ([] if spec.encoder else rope.extra_tensors(config)):
        # llama.cpp's converter writes the tensors it makes (rope_freqs) before the model's
        named.append((-1, name, _made(name, array, model.source)))
    # the source's order, as llama.cpp's converter writes (lm_head first in a checkpoint
    # whose names sort it there; made tensors before all, a layer's stacks after its experts)
    named.sort(key=lambda t: t[0])
    if flag(options, "vocab_only"):
        return spec, [], []
    quant = options.get("quant")
    state = None
    if quant and quant not in ("f32", "f16", "bf16") and not flag(options, "pure"):
        n_gqa = config["num_attention_heads"] // (config.get("num_key_value_heads") or config["num_attention_heads"])
        state = mixes.new_state([n for _, n, _ in named], n_gqa,
                                n_expert=int(archs._experts(config) or 0) if spec.experts else 0,
                                n_layer=int(config.get("num_hidden_layers") or 0),
                                has_imatrix=imatrix is not None)
    ftype = float_type(model, options)
    notes: list[str] = []
    planned = []
    for _, name, ref in named:
        gtype = mixes.choose_type(state, quant, name, ref.shape, ftype, notes)
        planned.append(Planned(name, tuple(ref.shape), gtype, ref,
                               None if ref.parts else archs.transform(spec, config, name),
                               importance_for(imatrix, name, tuple(ref.shape), gtype,
                                              len(ref.parts) or 1, options.get("imatrix"), notes,
                                              quant)))
    return spec, planned, notes


def quantize_blocks(array: np.ndarray, gtype: T, name: str,
                    importance: np.ndarray | None = None) -> np.ndarray:
    """ggml blocks of ``array`` (f32) as uint8 of shape (*rows, row_bytes), from the
    registry's scheme (quant-rowwise provides them; without it the core's error says so),
    guided by the per-column ``importance`` when given."""
    scheme = mixes.SCHEME_OF[gtype]
    options: dict[str, Any] = {"name": name}
    if importance is not None:
        options["weights"] = importance
    blocks = convcore.quantize(array, scheme, options).data["blocks"]
    block, size = gguf.GGML_QUANT_SIZES[gtype]
    expected = (*array.shape[:-1], array.shape[-1] // block * size)
    if blocks.dtype != np.uint8 or tuple(blocks.shape) != expected:
        raise ConvcoreError(f"{name}: scheme {scheme} returned {blocks.dtype}{list(blocks.shape)}, "
                            f"expected uint8{list(expected)}")
    return blocks


CHUNK_ELEMENTS = 1 << 22   # tensors are converted in slices of rows of about this many values


@dataclass(frozen=True)
class Slice:
    """Rows [start, stop) of one planned tensor: the unit of work of the writer."""

    item: Planned
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return int(np.prod(self.item.shape[:-1], dtype=np.int64)) if len(self.item.shape) > 1 else 1


def slices(planned: list[Planned]) -> list[Slice]:
    """Row slices of every tensor, in file order. A tensor with a transform (q/k
    permutation, norm offset) is one slice, since the transform mixes rows."""
    out = []
    for item in planned:
        rows = int(np.prod(item.shape[:-1], dtype=np.int64)) if len(item.shape) > 1 else 1
        # a stacked tensor's slices stay within one expert (each read from its own source)
        per = rows // len(item.parts) if item.parts else rows
        step = per if item.fn is not None else min(per, max(1, CHUNK_ELEMENTS // max(1, item.shape[-1])))
        for base in range(0, max(rows, 1), max(per, 1)):
            end = min(base + max(per, 1), max(rows, 1))
            out.extend(Slice(item, a, min(a + step, end)) for a in range(base, end, max(step, 1)))
    return out


def produce(part: Slice) -> np.ndarray:
    """The bytes of a slice of rows as they go into the file (cast or quantized)."""
    item = part.item
    offset = 0
    if item.parts:   # one expert's rows of a stacked tensor
        per = part.rows // len(item.parts)
        array = np.asarray(item.parts[part.start // per].load())
        offset = part.start // per * per
    else:
        array = np.asarray(item.ref.load())
    if item.fn is not None:
        array = item.fn(array)
    rows = array.reshape(-1, array.shape[-1]) if array.ndim > 1 else array.reshape(1, -1)
    rows = rows[part.start - offset:part.stop - offset]
    if item.gtype in NUMPY_OF:
        return np.ascontiguousarray(cast(rows, NUMPY_OF[item.gtype]))
    importance = None
    if item.importance is not None:   # one expert's row for a stack, else the only row
        importance = item.importance[offset // max(1, part.rows // len(item.parts)) if item.parts else 0]
    return quantize_blocks(np.ascontiguousarray(cast(rows, "f32")), item.gtype, item.name, importance)


def _begin_tensor(writer: gguf.GGUFWriter, item: Planned):
    """Open the data of ``item`` in its shard (aligned); mirrors GGUFWriter.write_tensor_data,
    which takes a whole tensor at once."""
    file_id = next(i for i, tensors in enumerate(writer.tensors) if tensors)
    name = next(iter(writer.tensors[file_id]))
    if name != item.name:
        raise AssertionError(f"writing {item.name} where the header has {name}")
    info = writer.tensors[file_id].pop(name)
    fout = writer.fout[file_id]
    writer.write_padding(fout, fout.tell())
    return fout, info


def _layout_keys(spec: archs.Arch, config: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """Keys for the local/global layer layout of families llama.cpp runs with a default
    pattern (Gemma-2: every 2nd layer global, Gemma-3: every 6th): the per-layer pattern
    (true = sliding) only where the config's layers differ from it, and Gemma-3's local
    rope base (as llama.cpp's converter writes it)."""
    if not spec.swa_pattern:
        return []
    out: list[tuple[str, Any, str]] = []
    types = hfconfig.layer_types(config, spec.model_type)
    if types != ["sliding_attention" if (i + 1) % spec.swa_pattern else "full_attention"
                 for i in range(len(types))]:
        out.append(("attention.sliding_window_pattern", [t == "sliding_attention" for t in types], "bools"))
    if spec.gguf_arch == "gemma3":
        out.append(("rope.freq_base_swa",
                    hfconfig.rope_parameters(config, "sliding_attention", spec.model_type)["rope_theta"], "f32"))
    return out


def _add_value(writer: gguf.GGUFWriter, key: str, value: Any, kind: str) -> None:
    if kind == "bools":
        writer.add_array(key, [bool(v) for v in value])
    elif kind == "u32":
        writer.add_uint32(key, int(value))
    elif kind == "f32":
        writer.add_float32(key, float(value))
    elif kind == "bool":
        writer.add_bool(key, bool(value))
    else:
        writer.add_string(key, str(value))


def _metadata_value(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint64(key, value) if value >= 0 else writer.add_int64(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:
        writer.add_string(key, str(value))


def parameter_count(planned: list[Planned]) -> tuple[int, int, int, int]:
    """(total, shared, per-expert, expert count) of the tensors planned, as gguf-py's
    GGUFWriter.get_total_parameter_count counts them (for ``general.size_label``)."""
    total = shared = expert = expert_sum = n_expert_tensors = 0
    for p in planned:
        size = int(np.prod(p.shape, dtype=np.int64))
        if "_exps." in p.name and len(p.shape) >= 3:
            count = int(p.shape[-2 if ".bias" in p.name else -3])
            expert += size // count
            expert_sum += count
            n_expert_tensors += 1
        else:
            shared += size
        total += size
    return total, shared, expert, (expert_sum // n_expert_tensors if n_expert_tensors else 0)


def card_metadata(model: Model, params: tuple[int, int, int, int]) -> Any:
    """gguf-py's ``Metadata`` of the source, read as llama.cpp's converter reads it (the
    model card's front matter, config.json, generation_config.json of a source
    directory; name, basename, finetune, version and size label by its heuristics), or
    None when the source is no directory or its card cannot be read."""
    source = Path(model.source or "")
    if not source.is_dir():
        return None
    try:
        found = gguf.Metadata.load(None, source, None, params[0])
    except Exception:  # noqa: BLE001 - a card gguf-py cannot parse: the name alone, as before
        return None
    if found.size_label is None and params[0] > 0:
        found.size_label = gguf.size_label(*params)
    return found


def add_metadata(writer: gguf.GGUFWriter, model: Model, spec: archs.Arch, options: dict[str, Any],
                 file_type: int, params: tuple[int, int, int, int] = (0, 0, 0, 0)) -> list[str]:
    """general.*, hyper-parameter and tokenizer keys; returns warnings."""
    config = {**spec.config_defaults, **model.config}
    meta = dict(options.get("metadata") or {})
    writer.add_type("model")
    files = dict(model.tokenizer)
    if "vocab.txt" not in files and "tokenizer.json" not in files:
        raw = companion(model, "vocab.txt")   # WordPiece models without a tokenizer.json
        if raw is not None:
            files["vocab.txt"] = raw
    vocab = vocab_mod.read_vocab(files, config)
    warnings: list[str] = []
    card = card_metadata(model, params)
    name = str(meta.pop("name", None) or model.metadata.get("name") or (card and card.name)
               or Path(model.source.rstrip("/")).name or spec.model_type)
    if PHI3_NAME.search(name) and vocab is not None and not PHI3_TOKENS <= set(vocab.tokens):
        # llama.cpp sets strip flags on these tokens for any model whose name says phi-3,
        # and fails to load when one is missing from the vocabulary.
        warnings.append(f"general.name {name!r} would make llama.cpp look for tokens "
                        f"{sorted(PHI3_TOKENS - set(vocab.tokens))} this vocabulary lacks; "
                        "writing the name without 'phi3'")
        name = PHI3_NAME.sub("phi", name)
        if card is not None:
            card.basename = card.basename and PHI3_NAME.sub("phi", card.basename)
    if card is not None:
        card.name = name
        card.set_gguf_meta_model(writer)
    else:
        writer.add_name(name)
    for key, fn, kind, _ in spec.hparams:
        value = fn(config)
        if value is not None:
            _add_value(writer, f"{spec.gguf_arch}.{key}", value, kind)
    for key, value, kind in _layout_keys(spec, config) + (spec.extra_keys(model, config) if spec.extra_keys else []):
        _add_value(writer, f"{spec.gguf_arch}.{key}", value, kind)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)   # as llama.cpp's converter
    for key, value in meta.items():
        _metadata_value(writer, key if "." in key else f"general.{key}", value)
    if vocab is None:
        warnings.append(f"{model.source}: no tokenizer.model, BPE or WordPiece tokenizer.json "
                        "or vocab.txt; the GGUF has no vocabulary")
    else:
        vocab_mod.add_to_writer(writer, vocab)
        warnings.extend(vocab.warnings)
    return warnings


def write_gguf(model: Model, path: Path, options: dict[str, Any],
               progress: Callable[[str], None]) -> Path:
    """Write ``model`` as GGUF at ``path`` (plus shards beside it); returns the first file."""
    imatrix = read_imatrix(Path(options["imatrix"])) if options.get("imatrix") else None
    spec, planned, notes = plan(model, options, imatrix)
    quant = options.get("quant")
    if quant:
        file_type = int(mixes.FILE_TYPES[quant][0])
    else:
        file_type = int({T.F32: gguf.LlamaFileType.ALL_F32, T.F16: gguf.LlamaFileType.MOSTLY_F16,
                         T.BF16: gguf.LlamaFileType.MOSTLY_BF16}[float_type(model, options)])
    max_tensors = int(options.get("split_max_tensors") or 0)
    max_size = convcore.parse_size(options.get("split_max_size") or 0)
    if flag(options, "dry_run"):
        shard, count, size = 1, 0, 0
        for item in planned:
            # the same rule as GGUFWriter.add_tensor_info
            if count and ((max_tensors and count >= max_tensors)
                          or (max_size and size + item.nbytes > max_size)):
                shard, count, size = shard + 1, 0, 0
            count, size = count + 1, size + item.nbytes
            split = f"\tshard {shard}" if max_tensors or max_size else ""
            print(f"{item.name}\t{list(item.shape)}\t{item.gtype.name.lower()}{split}")
        print(f"total {sum(p.nbytes for p in planned):,} bytes of tensor data", file=sys.stderr)
        for note in notes:
            warn(note)
        return path
    for note in notes:
        warn(note)
    # let the scheme plugins get ready for the types the plan uses (e.g. compile their
    # kernels side by side) before the first tensor needs one
    convcore.prepare([mixes.SCHEME_OF[p.gtype] for p in planned if p.gtype in mixes.SCHEME_OF],
                     [p.ref.dtype for p in planned])
    path = Path(path)
    writer = gguf.GGUFWriter(path, spec.gguf_arch, split_max_tensors=max_tensors,
                             split_max_size=max_size)
    try:
        for w in add_metadata(writer, model, spec, options, file_type, parameter_count(planned)):
            warn(w)
        if imatrix is not None:
            add_imatrix_keys(writer, imatrix, str(options["imatrix"]))
        for item in planned:
            writer.add_tensor_info(item.name, item.shape, np.dtype(np.float32), item.nbytes,
                                   raw_dtype=item.gtype)
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        # slices of rows are converted on up to ``jobs`` threads while the main thread
        # writes, so memory holds a few slices, never whole big tensors
        jobs = max(1, int(options.get("jobs") or 1))
        work = slices(planned)
        fout = info = None
        written = 0
        for part, data in zip(work, convcore.ordered_map(produce, work, jobs)):
            if part.start == 0:
                fout, info = _begin_tensor(writer, part.item)
                written = 0
            # fout.write, not data.tofile: tofile writes through a C FILE of its own and
            # drops a failed flush (a full disk) without an error
            fout.write(memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8)))
            written += data.nbytes
            if part.stop >= part.rows:
                if written != info.nbytes:
                    raise ConvcoreError(f"{part.item.name}: wrote {written} bytes, planned {info.nbytes}")
                writer.write_padding(fout, info.nbytes)
                progress(part.item.ref.name)
        shards = writer.format_shard_names(path)
    finally:
        writer.close()
    return shards[0]
