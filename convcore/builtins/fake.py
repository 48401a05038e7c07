"""Built-in format ``fake``: a real architecture's exact tensors with generated values.

``convcore fake SRC -o DIR`` (or ``convcore run SRC --from fake --to FMT``) reads SRC's
config (a model folder or a ``config.json`` alone), tokenizer and companion files, asks
transformers which tensors that architecture has (the model is built on torch's ``meta``
device: names, shapes and dtypes, no memory), and hands out each tensor's values made a
block of rows at a time as a writer reads them, so a 70B-shaped fake costs the memory of
a block. Values: ``random`` draws N(0, initializer_range) for matrices, ones for norm
weights and zeros for biases (a model transformers runs), deterministic under ``seed``;
``zeros`` is zeros everywhere but norms. ``layers`` keeps the first N layers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..hookspecs import hookimpl
from ..model import ConvcoreError, Model, TensorRef, arch_of, cast, numpy_dtype
from ..registry import Format
from ..rowblocks import row_block_loaders

INITS = ("random", "zeros")
LAYER_LISTS = ("layer_types", "sliding_window_pattern_list", "mlp_only_layers", "layers_block_type")


@hookimpl
def convcore_register_formats(register: Callable[..., None]) -> None:
    register(Format(name="fake", description="generated weights of SRC's architecture (convcore fake)",
                    directory=True, can_write=False))


def _config(src: Path) -> tuple[dict[str, Any], Path | None]:
    """SRC's config and the folder its tokenizer and companions come from (None for a
    config.json given alone)."""
    from .hf import read_json

    file = src if src.is_file() else src / "config.json"
    config = read_json(file)
    if not isinstance(config, dict):
        raise ConvcoreError(f"{file}: not a JSON object")
    if not config.get("model_type") and not config.get("architectures"):
        raise ConvcoreError(f"{file}: no model_type or architectures: cannot tell the architecture")
    return config, (src if src.is_dir() else None)


def with_layers(config: dict[str, Any], layers: int | None) -> dict[str, Any]:
    """``config`` keeping the first ``layers`` layers (per-layer lists cut to match)."""
    if not layers:
        return dict(config)
    out = dict(config)
    for scope in [out, *(out[k] for k in ("text_config",) if isinstance(out.get(k), dict))]:
        total = scope.get("num_hidden_layers")
        if isinstance(total, int):
            if layers > total:
                raise ConvcoreError(f"--layers {layers}: the config has {total} layers")
            scope["num_hidden_layers"] = layers
            for key in LAYER_LISTS:
                if isinstance(scope.get(key), list) and len(scope[key]) == total:
                    scope[key] = scope[key][:layers]
    return out


def architecture_tensors(config: dict[str, Any], where: Path) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of every tensor a checkpoint of ``config`` holds, as
    transformers' model of it (built on the meta device) saves them: tied weights once."""
    key = json.dumps(config, sort_keys=True, default=str)
    if key not in _TENSORS:
        _TENSORS.clear()
        _TENSORS[key] = _in_child(config, where)
    return _TENSORS[key]


def _in_child(config: dict[str, Any], where: Path) -> list[tuple[str, tuple[int, ...], str]]:
    """:func:`_architecture_tensors` in a child process: torch and the model's code (about
    350 MB) never enter this one, whose memory then stays that of a block of values."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "convcore.builtins.fake", str(where)], text=True,
                          input=json.dumps(config), capture_output=True)
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
        message = lines[-1] if lines else f"exit {done.returncode}"
        raise ConvcoreError(message.removeprefix("error: "))
    return [(name, tuple(shape), dtype) for name, shape, dtype in json.loads(done.stdout)]


_TENSORS: dict[str, list[tuple[str, tuple[int, ...], str]]] = {}   # the last config's


def _architecture_tensors(config: dict[str, Any], where: Path) -> list[tuple[str, tuple[int, ...], str]]:
    try:
        import torch
        import transformers
    except ImportError:
        raise ConvcoreError("convcore fake needs transformers and torch (pip install 'convcore[torch]')") from None
    try:
        cfg = transformers.AutoConfig.for_model(**config)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConvcoreError(f"{where}: transformers does not know this config ({exc})") from None
    names = [a for a in (config.get("architectures") or []) if hasattr(transformers, a)]
    dtype = {"float16": "f16", "bfloat16": "bf16"}.get(str(config.get("torch_dtype") or config.get("dtype")), "f32")
    with torch.device("meta"):
        try:
            model = (getattr(transformers, names[0])(cfg) if names
                     else transformers.AutoModelForCausalLM.from_config(cfg))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConvcoreError(f"{where}: transformers cannot build this model ({exc})") from None
    seen: set[int] = set()
    out = []
    for name, tensor in [*model.named_parameters(remove_duplicate=False),
                         *model.named_buffers(remove_duplicate=False)]:
        persistent = name.rsplit(".", 1)[-1] not in getattr(_owner(model, name), "_non_persistent_buffers_set", ())
        if id(tensor) in seen or not persistent:
            continue
        seen.add(id(tensor))
        kind = dtype if tensor.is_floating_point() else {"torch.int64": "i64", "torch.int32": "i32",
                                                         "torch.bool": "bool"}.get(str(tensor.dtype), "i64")
        out.append((name, tuple(int(d) for d in tensor.shape), kind))
    return out


def _owner(model: Any, name: str) -> Any:
    module = model
    for part in name.split(".")[:-1]:
        module = getattr(module, part)
    return module


def _values(name: str, shape: tuple[int, ...], dtype: str, init: str, std: float, seed: int,
            index: int) -> tuple[Callable[[], np.ndarray], Callable[[str], Any]]:
    """``(load, chunk_loader)`` making the tensor a block of rows at a time."""
    leaf = name.rsplit(".", 1)[-1]
    norm = leaf == "weight" and len(shape) == 1 and "norm" in name
    zero = init == "zeros" or leaf == "bias" or dtype not in ("f32", "f16", "bf16")

    def rows(a: int, b: int) -> np.ndarray:
        width = shape[-1] if shape else 1
        if norm:
            return cast(np.ones((b - a, width), np.float32), dtype)
        if zero:
            return np.zeros((b - a, width), numpy_dtype(dtype))
        rng = np.random.default_rng([seed, index, a])   # a block's values depend on nothing else
        block = rng.standard_normal((b - a, width), dtype=np.float32)
        block *= np.float32(std)
        return cast(block, dtype)

    return row_block_loaders(shape or (1,), rows, dtype)


def load_fake(src: Path, options: dict[str, Any]) -> Model:
    """The fake model of SRC (options: ``init``, ``seed``, ``layers``)."""
    from .hf import read_companions, read_tokenizer_files

    init = str(options.get("init") or "random")
    if init not in INITS:
        raise ConvcoreError(f"--init must be one of {', '.join(INITS)}, not {init!r}")
    config, folder = _config(src)
    config = with_layers(config, options.get("layers"))
    seed = int(options.get("seed") or 0)
    std = float(config.get("initializer_range") or (config.get("text_config") or {}).get("initializer_range") or 0.02)
    tensors = {}
    for index, (name, shape, dtype) in enumerate(architecture_tensors(config, src)):
        load, pieces = _values(name, shape, dtype, init, std, seed, index)
        if not shape:
            load = (lambda f=load: f().reshape(()))
            pieces = None
        tensors[name] = TensorRef(name, shape, dtype, load, source=f"{src} (fake {init} values)",
                                  chunk_loader=pieces)
    metadata = {"source": str(src), "fake": f"{init} values, seed {seed}"}
    return Model(arch=arch_of(config), config=config, tensors=tensors,
                 tokenizer=read_tokenizer_files(folder) if folder else {},
                 metadata=metadata, source=str(src), format="fake",
                 companions=read_companions(folder) if folder else {})


@hookimpl
def convcore_load(path: Path, fmt: str, options: dict[str, Any]) -> Model | None:
    if fmt != "fake":
        return None
    return load_fake(Path(path), options)


def describe(model: Model) -> str:
    """One line for the command's report."""
    return (f"{model.arch}: {model.num_params / 1e9:.3f}B params in {len(model.tensors)} tensors, "
            f"{model.nbytes / 1e9:.2f} GB ({model.metadata['fake']})")


if __name__ == "__main__":   # the child of _in_child: config on stdin, tensors on stdout
    import sys

    try:
        print(json.dumps(_architecture_tensors(json.loads(sys.stdin.read()), Path(sys.argv[1]))))
    except ConvcoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
