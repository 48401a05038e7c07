"""llama.cpp's own quantizer (llama-quantize) through llama-cpp-python's ctypes binding.

The one place tests and benchmarks call ``llama_model_quantize``, so the parameter
struct is filled the same way everywhere (the reference every GGUF quantization is
compared with).
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

from ..model import ConvcoreError


def ftype(name: str) -> int:
    """llama.cpp's file-type number for a type name such as ``"q4_k_m"``, ``"q8_0"`` or
    ``"f16"`` (its ``LLAMA_FTYPE_*`` constants, as llama-quantize names them)."""
    llama_cpp = _llama_cpp()
    upper = name.strip().upper()
    for const in (f"LLAMA_FTYPE_MOSTLY_{upper}", f"LLAMA_FTYPE_ALL_{upper}"):
        value = getattr(llama_cpp, const, None)
        if isinstance(value, int):
            return value
    known = sorted(c.removeprefix("LLAMA_FTYPE_").removeprefix("MOSTLY_").removeprefix("ALL_").lower()
                   for c in dir(llama_cpp) if c.startswith("LLAMA_FTYPE_") and c != "LLAMA_FTYPE_GUESSED")
    raise ConvcoreError(f"llama.cpp has no file type {name!r} (known: {', '.join(known)})")


def llama_quantize(src: Path | str, dst: Path | str, ftype_name: str, *, threads: int = 2,
                   pure: bool = False, imatrix: dict[str, Any] | None = None) -> Path:
    """Quantize the GGUF ``src`` into ``dst`` as llama-quantize does; returns ``dst``.

    :param ftype_name: the target file type by llama.cpp's name (``"q4_k_m"``).
    :param threads: llama.cpp's ``nthread``.
    :param pure: llama-quantize's ``--pure``: every weight in the type's base block type,
        no per-tensor mix.
    :param imatrix: the importance llama-quantize loads from an imatrix file: GGUF tensor
        name -> float32 values (sum / count; experts' rows one after another).
    """
    import numpy as np

    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype(ftype_name)
    params.nthread = int(threads)
    params.pure = bool(pure)
    keep = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            arr = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
            keep += [name.encode(), arr]
            entries[i].name = keep[-2]
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        keep.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ConvcoreError(f"{src}: llama_model_quantize to {ftype_name} failed (returned {rc})")
    return Path(dst)


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise ConvcoreError("llama.cpp's quantizer needs llama-cpp-python "
                            "(pip install llama-cpp-python)") from None
    return llama_cpp
