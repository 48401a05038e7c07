"""GGUF k-quants (q2_k q3_k q4_k q5_k q6_k) in ggml's block layouts: the entry points
``quantize_kquant`` / ``dequantize_kquant`` and the five schemes.

Each 256-weight super-block is first quantized with the algorithm llama.cpp's reference
quantizer uses when it has no importance matrix (``quantize_row_qN_K_ref``: the
weighted min/scale searches of ``make_qkx2_quants``, ``make_qx_quants`` and
``make_q3_quants``, then 6-/4-bit sub-block scales under an f16 super-scale), in float32.
Without the refinement (``refine=False``) the bytes equal ggml's for most blocks; the
others differ because float sums are reassociated or fused so they vectorize (the share
per type is in docs/benchmarks.md). Two departures lower the error further:

- a refinement pass per super-block: for q4_k/q5_k/q2_k a least-squares refit of the two
  f16 super-scales and +-1 steps of each 6-/4-bit sub-scale and sub-min; for q3_k/q6_k
  the integer sub-scale nearest each sub-block's least-squares optimum. A change is kept
  only when it lowers that (sub-)block's squared error.
- q2_k's scale search ranks candidates by weighted squared error instead of llama.cpp's
  weighted absolute error (the target here is RMSE; it is also faster).

With an importance matrix (``options["weights"]``: float32, one per column) each block is
coded as llama.cpp's ``quantize_row_qN_K_impl`` codes it with ``quant_weights``
(``kquant_wsearch``, ``kquant_wpack``), then refined as above, weighted by the same
importance-times-spread weights the search uses.

Input is read as raw bits (f32 as uint32, f16 and bf16 as uint16) and widened one
block at a time inside the kernel, so large tensors are never copied to f32.

The Numba kernels live beside this module, one concern each: ``kquant_bits`` (f16 bits,
rounding, widening input), ``kquant_search`` (llama.cpp's searches), ``kquant_refine``
(the refinement), ``kquant_pack`` (the per-type block packers and their row
drivers), ``kquant_wsearch`` and ``kquant_wpack`` (the same with an importance matrix) and
``kquant_dequant``. They are imported on first use, so importing this module
(as registering the schemes does) does not import numba; they and this module take
``QK_K`` from the leaf ``_qk``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

import convcore

from ._input import faulted_empty
from ._qk import QK_K  # re-exported: kquants.QK_K
from .kquant_importance import importance

TYPE_SIZE = {"q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210}
BITS = {name: size * 8 / QK_K for name, size in TYPE_SIZE.items()}
_KIND = {"q2_k": 2, "q3_k": 3, "q4_k": 4, "q5_k": 5, "q6_k": 6}


class KQuantError(convcore.ConvcoreError, ValueError):
    """Bad input to a k-quant: a row that is not a multiple of 256, NaN/Inf, a dtype."""


# f16 bits -> f32 bits, for the kernel's widening of f16 input (mode 1)
_F16_LUT = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(
    np.float32).view(np.uint32)
_NO_LUT = np.zeros(1, np.uint32)


def _bits_2d(array: np.ndarray, name: str, block: int = QK_K) -> tuple[np.ndarray, int, np.ndarray]:
    """A read-only 2-D uint16 view of the raw bits of ``array`` (no f32 copy), the widening
    mode and its table: 0 f32 (two uint16 per value), 1 f16 (through a table), 2 bf16.
    One array type for every input, so each row driver is compiled once. Rows must hold
    a whole number of ``block`` values."""
    arr = np.asarray(array)
    if arr.ndim == 0:
        raise KQuantError(f"{name}: expected an array with a last axis, found a scalar")
    n = arr.shape[-1]
    if n == 0 or n % block:
        raise KQuantError(
            f"{name}: row length must be a multiple of {block}, found {n} (shape {arr.shape})")
    kind = convcore.dtype_name(arr.dtype) if arr.dtype.kind in "fV" else str(arr.dtype)
    if kind not in ("f32", "f16", "bf16"):
        raise KQuantError(f"{name}: expected f32, f16 or bf16 input, found {arr.dtype}")
    arr = np.ascontiguousarray(arr).reshape(-1, n)
    bits = arr.view(np.uint16)  # a new view, so marking it read-only leaves ``array`` be
    bits.flags.writeable = False
    return bits, {"f32": 0, "f16": 1, "bf16": 2}[kind], _F16_LUT if kind == "f16" else _NO_LUT


def quantize_kquant(array: np.ndarray, name: str, refine: bool = True,
                    weights: Any = None) -> dict[str, np.ndarray]:
    """Quantize ``array`` (last axis = rows of 256k weights) to ggml ``name`` blocks, guided
    by ``weights`` (the importance of each column, shape ``(row_length,)``) when given.

    :returns: ``{"blocks": uint8 array of shape (*shape[:-1], row_blocks * type_size)}``.
    :raises KQuantError: (a ValueError) on a bad row length, dtype, NaN or Inf, or weights
        of another shape than ``(row_length,)``, non-finite or negative.
    """
    from ._compile import ensure
    from ._threads import run_split

    bits, mode, lut = _bits_2d(array, name)
    shape = np.shape(array)
    qw = None if weights is None else importance(weights, shape[-1], name, KQuantError)
    nb = shape[-1] // QK_K
    out = faulted_empty((bits.shape[0], nb * TYPE_SIZE[name]), np.uint8)
    total = bits.shape[0] * nb
    if total:
        ensure([name], (qw is not None,))
        kind = _KIND[name]
        if qw is None:
            from . import kquant_pack as kp

            drivers, head = (kp.rows_q2k, kp.rows_q3k, kp.rows_q45k, kp.rows_q6k), (bits, mode, lut)
        else:
            from . import kquant_wpack as kp

            drivers = (kp.rows_q2k_w, kp.rows_q3k_w, kp.rows_q45k_w, kp.rows_q6k_w)
            head = (bits, mode, lut, qw)
        if kind in (4, 5):
            kernel, args = drivers[2], (*head, 15 if kind == 4 else 31)
        else:
            kernel, args = drivers[{2: 0, 3: 1, 6: 3}[kind]], head
        bad = run_split(kernel, (*args, refine, out), total)
        if bad:
            raise KQuantError(f"{name}: NaN or Inf in input ({bad} of {total} blocks)")
    return {"blocks": out.reshape(*shape[:-1], nb * TYPE_SIZE[name])}


def dequantize_kquant(data: dict[str, np.ndarray], shape: tuple[int, ...], name: str,
                      dtype: str = "f32") -> np.ndarray:
    """The values of ``data["blocks"]`` as an array of ``shape``: float32 equal to
    gguf.quants.dequantize, or (``dtype="f16"``) float16 equal to that float32 cast with
    numpy's rounding, made block by block without a float32 copy of the tensor."""
    from . import kquant_dequant as kd
    from ._threads import run_split

    shape = tuple(int(s) for s in shape)
    n = shape[-1] if shape else 0
    if not shape or n % QK_K:
        raise KQuantError(f"{name}: row length must be a multiple of {QK_K}, found {n}")
    if dtype not in ("f32", "f16"):
        raise KQuantError(f"{name}: dequantizes to f32 or f16, not {dtype}")
    nb = n // QK_K
    ts = TYPE_SIZE[name]
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    blocks = np.ascontiguousarray(data["blocks"], dtype=np.uint8)
    if blocks.size != rows * nb * ts:
        raise KQuantError(
            f"{name}: expected {rows * nb * ts} block bytes for shape {shape}, found {blocks.size}")
    blocks = blocks.reshape(rows, nb * ts)  # a new view: read-only, one kernel type
    blocks.flags.writeable = False
    out = np.empty((rows, n), np.float32 if dtype == "f32" else np.float16)
    if rows and nb:
        mode = kd.OUT_F32 if dtype == "f32" else kd.OUT_F16
        kind = _KIND[name]
        if kind in (4, 5):
            kernel, args = kd.deq_q45k, (blocks, kind == 5, mode, out.view(np.uint16))
        else:
            kernel = {2: kd.deq_q2k, 3: kd.deq_q3k, 6: kd.deq_q6k}[kind]
            args = (blocks, mode, out.view(np.uint16))
        # runs of at least 256 blocks (64K values): a reader dequantizes a few million
        # values at a time, and smaller runs spend a quarter of the time in dispatch
        run_split(kernel, args, rows * nb, runs=min(256, max(1, rows * nb // 256)))
    return out.reshape(shape)


def prepare(names: list[str], dtypes: list[str]) -> None:
    """Scheme.prepare of the GGUF block schemes (legacy and k-quants): their row drivers,
    without and with an importance matrix, compiled side by side, or loaded from the kernel
    cache (one compiled driver serves every input dtype)."""
    from ._compile import ensure

    ensure(names)


def _scheme(name: str) -> convcore.Scheme:
    def quantize(array: np.ndarray, options: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        return quantize_kquant(array, name, weights=(options or {}).get("weights"))

    def dequantize(data: dict[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        return dequantize_kquant(data, shape, name)

    def dequantize_to(data: dict[str, np.ndarray], shape: tuple[int, ...], dtype: str) -> np.ndarray:
        if dtype in ("f32", "f16"):
            return dequantize_kquant(data, shape, name, dtype)
        return convcore.cast(dequantize_kquant(data, shape, name), dtype)

    quantize.__doc__ = (f"{name} blocks ({TYPE_SIZE[name]} B per 256 weights) of an f32/f16/bf16 "
                        "array; options[\"weights\"]: importance per column (an imatrix's).")
    dequantize.__doc__ = f"float32 values of {name} blocks, as gguf.quants.dequantize gives them."
    def layout(shape: tuple[int, ...], dtype: str) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {"blocks": ("u8", (*shape[:-1], shape[-1] // QK_K * TYPE_SIZE[name]))}

    return convcore.Scheme(
        name=name, quantize=quantize, dequantize=dequantize, layout=layout, block_size=QK_K,
        bits=BITS[name], family="gguf", prepare=prepare, dequantize_to=dequantize_to,
        description=f"GGUF {name.upper()}: super-blocks of 256 (llama.cpp's search, refined)",
    )


# The schemes the plugin registers (quant_rowwise/__init__.py registers this list).
SCHEMES: list[convcore.Scheme] = [_scheme(n) for n in TYPE_SIZE]
