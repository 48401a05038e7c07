"""LoRA adapter -> llama.cpp's adapter GGUF (what ``--lora`` / ``lora_path`` load).

The file has ``general.type = adapter``, ``adapter.type = lora`` and one
``adapter.lora.alpha``; each adapted weight ``blk.N.x.weight`` of the base has
``blk.N.x.weight.lora_a`` (ggml shape [in, r]) and ``.lora_b`` ([r, out]). llama.cpp scales
every pair by ``alpha / r``; a weight whose own scale differs (rsLoRA, PEFT's
``rank_pattern`` / ``alpha_pattern``, an mlx-lm scale) gets the ratio folded into its
``lora_b``. The q/k row permutation llama.cpp's converter applies to the base weights is
applied to ``lora_b``'s rows.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np

import convcore
from convcore import ConvcoreError, Model, cast

from . import arch_table, archs
from .writer import NUMPY_OF, T, quantize_blocks

FILE_TYPES = {T.F32: gguf.LlamaFileType.ALL_F32, T.F16: gguf.LlamaFileType.MOSTLY_F16,
              T.BF16: gguf.LlamaFileType.MOSTLY_BF16, T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}
MERGE_HINT = "merge it instead: convcore run BASE --lora ADAPTER --to gguf"


def adapter_type(model: Model, options: dict[str, Any]) -> T:
    """f32, f16, bf16 (``--dtype``) or q8_0 (``--quant``); else the adapter's own float type."""
    quant = options.get("quant")
    if quant and quant != "q8_0":
        raise ConvcoreError(f"{model.source}: a LoRA adapter GGUF holds f32, f16, bf16 or q8_0, "
                            f"not {quant} (llama.cpp's converter offers the same)")
    if quant:
        return T.Q8_0
    dtype = options.get("dtype")
    if dtype:
        return {"f32": T.F32, "f16": T.F16, "bf16": T.BF16}[dtype]
    kinds = {t.dtype for t in model.tensors.values()}
    return {frozenset({"f16"}): T.F16, frozenset({"bf16"}): T.BF16}.get(frozenset(kinds), T.F32)


def plan_adapter(model: Model, options: dict[str, Any]
                 ) -> tuple[archs.Arch, float, list[tuple[str, Callable[[], np.ndarray], T]]]:
    """(arch, alpha, [(GGUF name, make the f32 array, type)]) for the adapter file."""
    info = convcore.adapter_info(model)
    spec = arch_table.arch_for(model.arch, model.source)
    config = {**spec.config_defaults, **model.config}
    if info["replaced"]:
        raise ConvcoreError(f"{model.source}: the adapter replaces whole weights ({', '.join(info['replaced'])}, "
                            f"PEFT's modules_to_save), which llama.cpp's adapter file cannot hold; {MERGE_HINT}")
    alpha = float(info["alpha"])
    gtype = adapter_type(model, options)
    out = []
    for weight, a_ref, b_ref, scale in convcore.lora_pairs(model):
        name = archs.map_name(spec, weight)
        if name is None:
            raise ConvcoreError(f"{model.source}: the adapter changes {weight}, which has no GGUF name "
                                f"in architecture {spec.model_type} (an expert's weight?); {MERGE_HINT}")
        if name in ("token_embd.weight", "output.weight"):
            raise ConvcoreError(f"{model.source}: the adapter trains {weight} (the "
                                f"{'embedding' if name.startswith('token') else 'output layer'}), "
                                f"which llama.cpp's adapter loading does not apply as converted here; {MERGE_HINT}")
        rank = int(a_ref.shape[0])
        applied = alpha / rank if alpha else 1.0   # what llama.cpp multiplies the pair by
        factor = np.float32(scale / applied)
        reorder = archs.transform(spec, config, name)
        if reorder is not None and not getattr(reorder, "rows_only", False):
            reorder = None   # norm offsets: never on a 2-D weight

        def make_b(ref=b_ref, factor=factor, reorder=reorder) -> np.ndarray:
            b = cast(np.asarray(ref.load()), "f32")
            if factor != 1:
                b = b * factor
            return b if reorder is None else reorder(b)

        def make_a(ref=a_ref) -> np.ndarray:
            return cast(np.asarray(ref.load()), "f32")

        for suffix, make, cols in ((".lora_a", make_a, a_ref.shape[1]), (".lora_b", make_b, b_ref.shape[1])):
            # q8_0 needs rows of whole 32-value blocks; llama.cpp's converter falls back to f16
            kind = T.F16 if gtype == T.Q8_0 and cols % 32 else gtype
            out.append((name + suffix, make, kind))
    return spec, alpha, out


def write_adapter(model: Model, path: Path, options: dict[str, Any], progress: Callable[[str], None]) -> Path:
    """Write the adapter ``model`` as llama.cpp's LoRA GGUF at ``path``."""
    spec, alpha, planned = plan_adapter(model, options)
    gtype = adapter_type(model, options)
    if options.get("dry_run"):
        for name, _, kind in planned:
            print(f"{name}\t{kind.name.lower()}")
        return path
    if gtype == T.Q8_0:
        convcore.prepare(["q8_0"], ["f32"])
    writer = gguf.GGUFWriter(path, spec.gguf_arch)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        meta = dict(options.get("metadata") or {})
        writer.add_name(str(meta.pop("name", None) or model.metadata.get("name") or Path(model.source).name))
        writer.add_file_type(int(FILE_TYPES[gtype]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value in meta.items():
            writer.add_string(key if "." in key else f"general.{key}", str(value))
        for name, make, kind in planned:
            array = make()
            if kind in NUMPY_OF:
                data = np.ascontiguousarray(cast(array, NUMPY_OF[kind]))
                writer.add_tensor(name, data.view(np.uint16) if kind == T.BF16 else data, raw_dtype=kind)
            else:
                blocks = quantize_blocks(np.ascontiguousarray(array), kind, name)
                writer.add_tensor(name, blocks, raw_dtype=kind)   # shape from the block bytes
            progress(name)
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return Path(path)
