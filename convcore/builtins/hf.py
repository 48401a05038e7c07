"""Built-in format ``hf``: a Hugging Face model directory.

Reads ``config.json``, the tokenizer files and the weights from ``model.safetensors``,
a sharded ``model.safetensors.index.json``, or ``pytorch_model.bin`` (and its index,
through ``torch.load(weights_only=True)``). Writes sharded safetensors with an index,
config and tokenizer files. Runs inference with transformers.

Every other file of the source directory and of its numbered sentence-transformers module
folders (model card, licence, ``modules.json``, ``1_Pooling/config.json``, ...) travels as
a companion (:func:`read_companions`, :func:`write_companions`), so the output holds
everything the source held besides weights.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import sys
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import numpy as np

from ..hookspecs import hookimpl
from ..model import FLOAT_DTYPES, ConvcoreError, Model, TensorRef, arch_of
from ..options import Option
from ..quantized import dequantized_model
from ..registry import Format
from ..safetensors_io import (AHEAD_BYTES, PlannedTensor, index_shards, inside_model, open_tensors, read_header,
                              with_user_metadata, write_sharded)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
    "chat_template.json",
)
EXTRA_FILES = ("generation_config.json",)
TORCH_DTYPE_NAMES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
# What an HF writer (ours, save_pretrained) leaves in a model directory besides companions.
HF_OUTPUTS = ("config.json", "model.safetensors", "model-*-of-*.safetensors",
              "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model-*-of-*.bin",
              "pytorch_model.bin.index.json")
# Weight files and their indexes (of any framework): the model's tensors, never companions.
WEIGHT_PATTERNS = (
    "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.ot", "*.gguf",
    "*.onnx", "*.onnx_data", "*.onnx.data", "*.safetensors.index.json", "*.bin.index.json",
    "*.h5.index.json", "*.msgpack.index.json",
)
COMPANION_MAX_BYTES = 10 * 1000**2  # a larger file is skipped with a warning, never carried
# sentence-transformers module folders: 1_Pooling, 2_Normalize, 2_Dense, ...
MODULE_FOLDER = re.compile(r"[0-9]+_.+")
DEFAULT_MAX_SHARD = 5 * 1000**3  # transformers' save_pretrained default, "5GB"
OPTIONS = (
    Option("split_max_size", "size", DEFAULT_MAX_SHARD, "largest safetensors shard (e.g. 2G)"),
    Option("dry_run", "bool", False, "print each tensor's shard, type and shape; write nothing"),
)


def detect(path: Path) -> int:
    """Score 10 for a directory with config.json and HF weights (5 without config.json,
    so the loader can say what is missing); mlx dirs score higher in their own detector
    because their safetensors metadata says ``"mlx"``."""
    if not path.is_dir():
        return 0
    weights = (list(path.glob("*.safetensors")) + list(path.glob("pytorch_model*.bin"))
               + list(path.glob("*.safetensors.index.json")))
    has_config = (path / "config.json").is_file()
    if weights:
        return 10 if has_config else 5
    return 1 if has_config else 0


@hookimpl
def convcore_register_formats(register: Callable[..., None]) -> None:
    register(Format(name="hf", description="Hugging Face model directory (safetensors or .bin)",
                    directory=True, detect=detect, outputs=HF_OUTPUTS, options=OPTIONS))


# reading ------------------------------------------------------------------------------
def read_json(path: Path) -> Any:
    """Parse a JSON file, or raise a one-line error naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConvcoreError(f"{path}: missing") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConvcoreError(f"{path}: not valid JSON ({exc})") from None


def _weight_files(path: Path) -> tuple[str, list[Path]]:
    """(kind, files) of the checkpoint in ``path``; kind is "safetensors" or "bin"."""
    for kind, single, index in (
        ("safetensors", "model.safetensors", "model.safetensors.index.json"),
        ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (path / index).is_file():
            return kind, index_shards(inside_model(path / index, path))
        if (path / single).is_file():
            return kind, [inside_model(path / single, path)]
    others = sorted(p.name for p in path.glob("*.safetensors"))
    if others:
        return "safetensors", [inside_model(path / n, path) for n in others]
    raise ConvcoreError(f"{path}: no model.safetensors, safetensors index or pytorch_model.bin")


def _bin_tensors(files: list[Path]) -> dict[str, TensorRef]:
    try:
        import torch
    except ImportError:
        raise ConvcoreError(
            f"{files[0]}: reading .bin checkpoints needs torch (pip install 'convcore[torch]')"
        ) from None

    cache: dict[Path, dict] = {}

    def state_dict(file: Path) -> dict:
        if file not in cache:
            cache.clear()  # one shard mapped at a time
            try:
                cache[file] = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many types for broken archives
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ConvcoreError(f"{file}: cannot read checkpoint: {first}") from None
            if not isinstance(cache[file], dict):
                raise ConvcoreError(f"{file}: not a state dict")
        return cache[file]

    def to_numpy(t: "torch.Tensor") -> np.ndarray:
        t = t.detach().contiguous()
        if t.dtype == torch.bfloat16:
            import ml_dtypes
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    refs: dict[str, TensorRef] = {}
    for file in files:
        for name, t in state_dict(file).items():
            if not isinstance(t, torch.Tensor):
                continue
            dtype = _torch_dtype_name(t.dtype)
            refs[name] = TensorRef(name, tuple(t.shape), dtype,
                                   (lambda f=file, n=name: to_numpy(state_dict(f)[n])),
                                   source=str(file))
    return refs


def _torch_dtype_name(dtype: Any) -> str:
    names = {"torch.float32": "f32", "torch.float16": "f16", "torch.bfloat16": "bf16",
             "torch.float64": "f64", "torch.int64": "i64", "torch.int32": "i32",
             "torch.int16": "i16", "torch.int8": "i8", "torch.uint8": "u8", "torch.bool": "bool"}
    try:
        return names[str(dtype)]
    except KeyError:
        raise ConvcoreError(f"unsupported torch dtype {dtype}") from None


def read_tokenizer_files(path: Path) -> dict[str, bytes]:
    """The HF tokenizer files present in ``path``, by file name."""
    return {name: (path / name).read_bytes() for name in TOKENIZER_FILES if (path / name).is_file()}


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _inside(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def read_companions(path: str | os.PathLike, exclude: tuple[str, ...] = ()) -> dict[str, bytes]:
    """The companion files of the model directory ``path``, by relative POSIX path.

    Companions are the regular files of ``path`` that are neither weights (see
    :data:`WEIGHT_PATTERNS`), ``config.json``, tokenizer files nor
    ``generation_config.json``, plus every file under its numbered sentence-transformers
    module folders (``1_Pooling/``, ``2_Normalize/``, ``2_Dense/``: a module's own state
    travels whole). Hidden names are skipped, and so are names matching one of the
    ``exclude`` glob patterns (a format's own files). A file over
    :data:`COMPANION_MAX_BYTES` is skipped with a warning on stderr. Symlinked folders are
    never followed; a symlinked file is read only when it resolves inside ``path`` (or,
    for a hub cache snapshot, into that repository's ``blobs/``).
    """
    root = Path(os.path.abspath(path))
    out: dict[str, bytes] = {}

    def excluded(name: str, patterns: tuple[str, ...]) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    def take(file: Path, rel: str) -> None:
        if file.is_symlink():
            try:
                inside_model(file, root)
            except ConvcoreError:
                _warn(f"{file}: links outside the model directory; not carried over")
                return
        if not file.is_file():  # a dangling link, a socket, ...
            return
        size = file.stat().st_size
        if size > COMPANION_MAX_BYTES:
            _warn(f"{file}: {size:,} bytes, over the {COMPANION_MAX_BYTES:,}-byte limit for "
                  "files carried beside the weights; not carried over")
            return
        out[rel] = file.read_bytes()

    skip_top = ("config.json", *TOKENIZER_FILES, *EXTRA_FILES, *WEIGHT_PATTERNS, *exclude)
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        name = entry.name
        if name.startswith("."):
            continue
        if entry.is_symlink() and entry.is_dir():
            continue  # never follow a linked folder
        if entry.is_dir():
            if not MODULE_FOLDER.fullmatch(name):
                continue  # onnx/, openvino/, original/, ...: other copies of the weights
            for folder, dirs, files in os.walk(entry, followlinks=False):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                rel_folder = Path(folder).relative_to(root).as_posix()
                for f in sorted(files):
                    if f.startswith(".") or excluded(f, exclude):
                        continue
                    take(Path(folder) / f, f"{rel_folder}/{f}")
            continue
        if not excluded(name, skip_top):
            take(entry, name)
    return out


def _companion_target(path: Path, name: str) -> Path:
    """Where companion ``name`` goes under the output directory ``path``; raises when the
    name is not a plain relative POSIX path that stays inside ``path``."""
    pure = PurePosixPath(name) if isinstance(name, str) else None
    if (pure is None or not name or "\\" in name or "\0" in name or pure.is_absolute()
            or re.match(r"^[A-Za-z]:", name) or any(part in ("..", ".", "") for part in name.split("/"))):
        raise ConvcoreError(f"companion file name {name!r} is not a plain relative path inside "
                            "the model directory; refusing to write it")
    root = path.resolve()
    target = (root / Path(*pure.parts)).resolve()
    if not _inside(target, root) or target == root:
        raise ConvcoreError(f"companion file name {name!r} resolves to {target}, outside the "
                            f"output directory {root}; refusing to write it")
    return target


def write_companions(path: str | os.PathLike, model: Model) -> None:
    """Write ``model.companions`` under the output directory ``path`` unchanged, creating
    their folders. Every name is checked before anything is written: a name that is
    absolute, holds ``..`` or backslashes, or resolves outside ``path`` is a
    :class:`ConvcoreError` naming it. A file the writer already wrote is left as it is
    (a format's own files win over a source's)."""
    path = Path(path)
    companions = getattr(model, "companions", None) or {}
    targets = {name: _companion_target(path, name) for name in companions}
    for name, target in targets.items():
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(companions[name])


def load_hf(path: Path) -> Model:
    """Describe the HF directory ``path`` as a lazy :class:`Model`."""
    if not path.is_dir():
        raise ConvcoreError(f"{path}: an hf model is a directory")
    config = read_json(path / "config.json")
    if not isinstance(config, dict):
        raise ConvcoreError(f"{path / 'config.json'}: not a JSON object")
    kind, files = _weight_files(path)
    tensors: dict[str, TensorRef] = {}
    if kind == "safetensors":
        for file in files:
            refs, _ = open_tensors(file)
            for name, ref in refs.items():
                if name in tensors:
                    raise ConvcoreError(f"{file}: tensor {name!r} also in {tensors[name].source}")
                tensors[name] = ref
    else:
        tensors = _bin_tensors(files)
    metadata: dict[str, Any] = {"source": str(path)}
    if config.get("quantization_config"):   # quantized layers read back as float32, lazily
        config, tensors, metadata["source_quantization"] = dequantized_model(config, tensors, path)
    if (path / "generation_config.json").is_file():
        metadata["generation_config"] = read_json(path / "generation_config.json")
    return Model(arch=arch_of(config), config=config, tensors=tensors,
                 tokenizer=read_tokenizer_files(path), metadata=metadata, source=str(path),
                 format="hf", companions=read_companions(path))


@hookimpl
def convcore_load(path: Path, fmt: str, options: dict[str, Any]) -> Model | None:
    if fmt != "hf":
        return None
    return load_hf(Path(path))


# writing ------------------------------------------------------------------------------
def output_dtype(options: dict[str, Any]) -> str | None:
    """The float type to cast floating tensors to, from ``--quant``/``--dtype``; None
    keeps each tensor's own type."""
    return options.get("dtype") or None


def write_config(path: Path, config: dict[str, Any], dtype: str | None) -> None:
    config = dict(config)
    if dtype:
        config["dtype"] = TORCH_DTYPE_NAMES[dtype]
        if "torch_dtype" in config:
            config["torch_dtype"] = TORCH_DTYPE_NAMES[dtype]
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_tokenizer_files(path: Path, model: Model) -> None:
    for name, data in model.tokenizer.items():
        (path / Path(name).name).write_bytes(data)
    gen = model.metadata.get("generation_config")
    if gen:
        (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


@hookimpl
def convcore_write(model: Model, path: Path, fmt: str, options: dict[str, Any],
                   progress: Callable[[str], None]) -> Path | None:
    if fmt != "hf":
        return None
    dtype = output_dtype(options)
    if options.get("quant"):
        raise ConvcoreError(f"format hf stores f32, f16 and bf16, not {options['quant']!r}")
    planned = []
    for ref in model.tensors.values():
        out = dtype if dtype and ref.dtype in FLOAT_DTYPES else ref.dtype
        planned.append(PlannedTensor(ref.name, out, ref.shape,
                                     (lambda r=ref, o=out: r.load_chunks(o))))
    max_shard = options.get("split_max_size") or DEFAULT_MAX_SHARD
    if options.get("dry_run"):
        from ..safetensors_io import plan_shards
        for i, shard in enumerate(plan_shards(planned, max_shard)):
            for t in shard:
                print(f"shard {i + 1}: {t.name} {t.dtype}{list(t.shape)}")
        return path
    path.mkdir(parents=True, exist_ok=True)
    write_sharded(path, planned, max_shard_size=max_shard,
                  metadata=with_user_metadata({"format": "pt"}, options.get("metadata"), "hf"),
                  ahead_bytes=AHEAD_BYTES,
                  on_written=lambda t: progress(t.name))
    write_config(path, model.config, dtype)
    write_tokenizer_files(path, model)
    write_companions(path, model)
    return path


# validation and inference --------------------------------------------------------------
@hookimpl
def convcore_validate(path: Path, fmt: str) -> list[str] | None:
    if fmt != "hf":
        return None
    problems = []
    try:
        config = read_json(Path(path) / "config.json")
        kind, files = _weight_files(Path(path))
        if kind == "safetensors":
            names: set[str] = set()
            for file in files:
                entries, _ = read_header(file)
                names.update(e.name for e in entries)
            index = Path(path) / "model.safetensors.index.json"
            if index.is_file():
                missing = set(read_json(index)["weight_map"]) - names
                if missing:
                    problems.append(f"{index}: {len(missing)} tensors in the index are in no shard, "
                                    f"e.g. {sorted(missing)[0]!r}")
        else:  # each checkpoint unpickled as loading does (weights_only, mapped)
            _bin_tensors(files)
        if not isinstance(config, dict) or not config.get("model_type"):
            problems.append(f"{Path(path) / 'config.json'}: no model_type")
    except ConvcoreError as exc:
        problems.append(str(exc))
    for name in EXTRA_FILES:  # read by loading too
        if (Path(path) / name).is_file():
            try:
                read_json(Path(path) / name)
            except ConvcoreError as exc:
                problems.append(str(exc))
    return problems


@hookimpl
def convcore_open_session(path: Path, fmt: str, options: dict[str, Any]) -> Any:
    if fmt != "hf":
        return None
    from ..pooling import is_encoder
    from .hf_runtime import TransformersEncoderSession, TransformersSession
    config_file = Path(path) / "config.json"
    config = read_json(config_file) if config_file.is_file() else {}
    if isinstance(config, dict) and is_encoder(config):
        return TransformersEncoderSession(Path(path), options)
    return TransformersSession(Path(path), options)
