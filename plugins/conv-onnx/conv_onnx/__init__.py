"""convcore plugin ``onnx``: Hugging Face <-> ONNX directories that ONNX Runtime and
onnxruntime-genai load.

Two writers. The **builder** (llama, mistral, qwen2, qwen3, phi3, gemma, gemma2,
gemma3_text) writes the graph straight from the weights, streaming each into
``model.onnx.data``: memory stays at a few tensors for any model size. The **export
path** (``-O path=export``, and automatically for other architectures) runs
``torch.onnx.export`` on the transformers model, encoders included. Weight-only int4 /
int8 go into com.microsoft ``MatMulNBits`` on both paths (schemes ``int{4,8}-b{16..256}[-asym]`` from
quant-rowwise). The reader maps initializers back to HF names (``convcore.tensors``
metadata), dequantizing MatMulNBits; the runtime session is plain onnxruntime with the
KV cache.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import convcore
from convcore import Format, Model, Option, hookimpl

from .archs import BUILDER_ARCHS

SCHEMES = tuple(f"int{bits}-b{block}{sym}" for bits in (4, 8) for block in (16, 32, 64, 128, 256)
                for sym in ("", "-asym"))
OUTPUTS = ("model.onnx", "model.onnx.data", "genai_config.json", "config.json")

OPTIONS = (
    Option("path", "choice", "auto", "builder (direct, constant memory), export "
           "(torch.onnx.export) or auto (builder when it knows the arch)",
           choices=("auto", "builder", "export")),
    Option("accuracy_level", "int", 4, "MatMulNBits accuracy_level (0 unset, 1 f32, 2 f16, 3 bf16, 4 int8)"),
    Option("quantize_lm_head", "bool", True, "quantize lm_head with --quant (false keeps it float)"),
    Option("context_length", "int", None, "rotary tables and genai max_length (default: the config's "
           "max_position_embeddings)"),
    Option("opset", "int", None, "export path: ONNX opset"),
    Option("dry_run", "bool", False, "print each initializer's name, type and shape; write nothing"),
)


def detect(path: Path) -> int:
    path = Path(path)
    if path.is_file() and path.suffix == ".onnx":
        return 20
    if path.is_dir() and (path / "model.onnx").is_file():
        return 30
    return 0


@hookimpl
def convcore_register_formats(register: Callable[..., None]) -> None:
    register(Format(name="onnx", description="ONNX directory for ONNX Runtime / onnxruntime-genai "
                    "(f32, f16, MatMulNBits int4/int8)",
                    directory=True, schemes=SCHEMES, detect=detect, outputs=OUTPUTS,
                    options=OPTIONS, scheme_package="quant-rowwise", architectures=architectures))


#: architectures the export path is tested on in onnxruntime (the builder's all are);
#: it takes others transformers and torch.onnx.export can handle, unchecked
EXPORT_CHECKED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmo2", "granite", "smollm3", "starcoder2",
                  "phi", "bert")


def architectures() -> dict[str, dict[str, Any]]:
    """The builder's architectures and the export path's checked ones, as Format declares."""
    out = {mt: {"write": True, "read": True, "checked": True, "note": "builder"} for mt in BUILDER_ARCHS}
    for mt in EXPORT_CHECKED:
        out[mt] = {"write": True, "read": True, "checked": True,
                   "note": "export, f32/f16/int4/int8" if mt != "bert" else "export, encoder"}
    return out


@hookimpl
def convcore_load(path: Path, fmt: str, options: dict[str, Any]) -> Model | None:
    if fmt != "onnx":
        return None
    from .reader import load_onnx
    return load_onnx(Path(path))


@hookimpl
def convcore_write(model: Model, path: Path, fmt: str, options: dict[str, Any],
                   progress: Callable[[str], None]) -> Path | None:
    if fmt != "onnx":
        return None
    model = convcore.text_model(model, "onnxruntime")
    how = options.get("path") or "auto"
    if how == "auto":
        how = "builder" if model.arch in BUILDER_ARCHS else "export"
        if how == "export":
            print(f"note: the onnx builder does not know {model.arch!r}; exporting the transformers "
                  "model with torch.onnx.export", file=sys.stderr)
    if how == "builder":
        from .builder import write_builder
        return write_builder(model, Path(path), options, progress)
    from .export import export_onnx
    return export_onnx(model, Path(path), options, progress)


@hookimpl
def convcore_validate(path: Path, fmt: str) -> list[str] | None:
    if fmt != "onnx":
        return None
    from .validate import validate_onnx
    return validate_onnx(Path(path))


@hookimpl
def convcore_open_session(path: Path, fmt: str, options: dict[str, Any]) -> Any:
    if fmt != "onnx":
        return None
    from .runtime import open_session
    return open_session(Path(path), options)
