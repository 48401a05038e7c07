"""Helpers shared by the conv-mlx tests: read an MLX dir's raw tensors and config, run
mlx-lm, and (without quant-rowwise) stand-in affine schemes computed by mlx itself."""
from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np

import convcore

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
TOKENS = [1, 17, 230, 5, 99, 512, 3, 42]
# mlx-lm's gemma3_text forward indexes layer sliding_window_pattern-1 (6 by default), so
# its tiny model needs 6 layers to run there.
ARCH_KW = {"gemma3_text": {"layers": 6}}


def tiny(factory, arch: str) -> Path:
    return factory(arch, **ARCH_KW.get(arch, {}))


def raw_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (dtype, shape, bytes) for every tensor in the dir's safetensors shards."""
    out = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        refs, meta = convcore.open_tensors(file)
        assert meta.get("format") == "mlx", f"{file}: metadata {meta}"
        for name, ref in refs.items():
            out[name] = (ref.dtype, ref.shape, np.ascontiguousarray(ref.load()).tobytes())
    return out


def config(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def mlx_logits(path: Path, tokens=TOKENS) -> np.ndarray:
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(path))
    logits = model(mx.array([tokens]))[0].astype(mx.float32)
    mx.eval(logits)
    return np.array(logits)


def mlx_lm_convert(src: Path, dst: Path, *, bits: int | None = None, group: int | None = None,
                   dtype: str | None = None, predicate=None) -> Path:
    """Run mlx-lm's own converter in-process. mlx_lm.convert copies a transformers-5
    config without the rope keys its own models read (``rope_theta``, ``rope_scaling``),
    so its output runs plain rope at its class default; they are added here, as this
    writer adds them, so the comparisons measure the tensors."""
    from conv_mlx.rope import mlx_keys
    from mlx_lm import convert

    convert(hf_path=str(src), mlx_path=str(dst), quantize=bits is not None, q_bits=bits,
            q_group_size=group, dtype=dtype, quant_predicate=predicate)
    cfg = config(dst)
    cfg.update(mlx_keys(config(src), cfg["model_type"]))
    (Path(dst) / "config.json").write_text(json.dumps(cfg, indent=4))
    return dst


def assert_same_tensors(ours: Path, theirs: Path) -> None:
    a, b = raw_tensors(ours), raw_tensors(theirs)
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))
    for name in a:
        assert a[name][:2] == b[name][:2], f"{name}: ours {a[name][:2]}, mlx-lm {b[name][:2]}"
        assert a[name][2] == b[name][2], f"{name}: bytes differ"


BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)
NAMES = tuple(f"int{b}-g{g}" for b in BITS for g in GROUPS)


def to_mx(array: np.ndarray):
    import mlx.core as mx
    if array.dtype == ml_dtypes.bfloat16:
        return mx.array(array.view(np.uint16)).view(mx.bfloat16)
    return mx.array(array)


def to_np(array) -> np.ndarray:
    import mlx.core as mx
    if array.dtype == mx.bfloat16:
        return np.array(array.view(mx.uint16)).view(ml_dtypes.bfloat16)
    return np.array(array)
