"""Built-in format ``hf``: a Hugging Face model directory.

Reads ``config.json``, the tokenizer files and the weights from ``model.safetensors``,
a sharded ``model.safetensors.index.json``, or ``pytorch_model.bin`` (and its index,
through ``torch.load(weights_only=True)``). Writes sharded safetensors with an index,
config and tokenizer files. Runs inference with transformers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..hookspecs import hookimpl
from ..model import FLOAT_DTYPES, ConvcoreError, Model, TensorRef, arch_of, cast_chunks
from ..options import Option
from ..registry import Format
from ..safetensors_io import PlannedTensor, index_shards, open_tensors, read_header, write_sharded

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
EXTRA_FILES = ("generation_config.json",)
TORCH_DTYPE_NAMES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
# What an HF writer (ours, save_pretrained) leaves in a model directory besides companions.
HF_OUTPUTS = ("config.json", "model.safetensors", "model-*-of-*.safetensors",
              "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model-*-of-*.bin",
              "pytorch_model.bin.index.json")
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
            return kind, index_shards(path / index)
        if (path / single).is_file():
            return kind, [path / single]
    others = sorted(p.name for p in path.glob("*.safetensors"))
    if others:
        return "safetensors", [path / n for n in others]
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
    if (path / "generation_config.json").is_file():
        metadata["generation_config"] = read_json(path / "generation_config.json")
    return Model(arch=arch_of(config), config=config, tensors=tensors,
                 tokenizer=read_tokenizer_files(path), metadata=metadata, source=str(path),
                 format="hf")


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
                                     (lambda r=ref, o=out: cast_chunks(r.load(), o))))
    max_shard = options.get("split_max_size") or DEFAULT_MAX_SHARD
    if options.get("dry_run"):
        from ..safetensors_io import plan_shards
        for i, shard in enumerate(plan_shards(planned, max_shard)):
            for t in shard:
                print(f"shard {i + 1}: {t.name} {t.dtype}{list(t.shape)}")
        return path
    path.mkdir(parents=True, exist_ok=True)
    write_sharded(path, planned, max_shard_size=max_shard, metadata={"format": "pt"},
                  on_written=lambda t: progress(t.name))
    write_config(path, model.config, dtype)
    write_tokenizer_files(path, model)
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
        if not isinstance(config, dict) or not config.get("model_type"):
            problems.append(f"{Path(path) / 'config.json'}: no model_type")
    except ConvcoreError as exc:
        problems.append(str(exc))
    return problems


@hookimpl
def convcore_open_session(path: Path, fmt: str, options: dict[str, Any]) -> Any:
    if fmt != "hf":
        return None
    from .hf_runtime import TransformersSession
    return TransformersSession(Path(path), options)
