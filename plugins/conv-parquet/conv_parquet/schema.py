"""The Parquet weight schemas (docs/parquet.md) and what each column holds.

One row per tensor (a tensor over the writer's ``chunk_size``: one per chunk):

=============  ==============  =========================================================
column         type            meaning
=============  ==============  =========================================================
layer_name     string          the tensor's Hugging Face name, unique in the file
shape          list<int32>     logical shape (row-major)
dtype          string          ``float32``, ``float16``, ``bfloat16``, ``int64``, ... (numpy
                               names); for a quantized row the type it was quantized from
data           binary          V1 / unquantized rows: the tensor's little-endian bytes
                               (``prod(shape) * itemsize``); quantized rows: the codes
num_params     int64           ``prod(shape)``
quant_type     string (V2)     ``none``, or the quantization scheme (``int8-row``, ...)
scales         binary (V2)     f32 bytes, or null when ``quant_type`` is ``none``
zero_points    binary (V2)     f32 bytes, or null (symmetric schemes, unquantized rows)
quant_axis     int32 (V2)      0: scales per row (every axis but the last, flattened);
                               -1: one scale for the tensor; null when unquantized
group_size     int32 (V2)      how many consecutive weights of a row share a scale: the
                               row length for per-row schemes, G for ``int{B}-g{G}``, 0
                               for per-tensor; null when unquantized
chunk          int32           only in files holding a chunked tensor: the row's place
                               (0, 1, ...) in its tensor; null for a tensor of one row
row_start      int64           with ``chunk``: the index along the tensor's first axis
                               where the row's slice starts; null for one-row tensors
=============  ==============  =========================================================

A tensor larger than the writer's ``chunk_size`` (as stored, or as floats before it is
quantized) is stored as several rows of the same
``layer_name``, in order, one row group each: ``chunk`` 0, 1, ... each holding a slice of
whole indices of the first axis (whole quantization rows and groups). ``shape`` is the
whole tensor's in every chunk; ``num_params`` is what the row holds (so ``sum(num_params)``
is still the model's size), and every other column describes the row's slice as it would
a tensor of shape ``(num_params / prod(shape[1:]), *shape[1:])``: its bytes, its scales
and zero points (a per-tensor scheme's one scale is repeated in every chunk).

What ``data`` and ``zero_points`` hold follows ``quant_type``'s family:

- per-row asymmetric ``int{1,2,4,8}-row``: ``data`` the codes, u8, rows padded to whole
  bytes, most significant bits first; ``zero_points`` the zero point of each row
  (w = (q - zp) * scale).
- ``int8-row-sym`` / ``int8-tensor``: ``data`` i8 codes; no zero points (w = q * scale).
- MLX affine ``int{B}-g{G}``: ``data`` the u32 little-endian packed words of
  ``mx.quantize``; ``zero_points`` holds the *biases* (w = scale * q + bias). Scales and
  biases are of ``dtype`` in the scheme (f16/bf16 widen to f32 exactly) and are cast back
  to it on reading, so a file dequantizes exactly as the scheme does.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
from convcore import ConvcoreError, Scheme, numpy_dtype

V1_COLUMNS = ("layer_name", "shape", "dtype", "data", "num_params")
QUANT_COLUMNS = ("quant_type", "scales", "zero_points", "quant_axis", "group_size")
V2_COLUMNS = V1_COLUMNS + QUANT_COLUMNS
CHUNK_COLUMNS = ("chunk", "row_start")
NOT_QUANTIZED = "none"
MAGIC = b"PAR1"  # the first and last four bytes of every Parquet file
PER_TENSOR_AXIS = -1
# A Parquet BYTE_ARRAY value and its page are sized by 32-bit signed integers; keep
# room for the page's own header and length prefix.
MAX_VALUE_BYTES = 2**31 - 1 - 4096
MAX_NDIM = 16

# the dtype column's spellings (numpy's names; bf16 and the f8 types as ml_dtypes names them)
DTYPE_NAMES = {
    "f64": "float64", "f32": "float32", "f16": "float16", "bf16": "bfloat16",
    "f8_e4m3": "float8_e4m3fn", "f8_e5m2": "float8_e5m2",
    "i64": "int64", "i32": "int32", "i16": "int16", "i8": "int8",
    "u64": "uint64", "u32": "uint32", "u16": "uint16", "u8": "uint8", "bool": "bool",
}
_FROM_NAME = {v: k for k, v in DTYPE_NAMES.items()} | {k: k for k in DTYPE_NAMES}
_FROM_NAME |= {"double": "f64", "float": "f32", "half": "f16", "bool_": "bool"}

# the type each column must have, as a predicate and the name shown in errors
_INT = pa.types.is_integer
# large and view variants too: polars and others record those in the Arrow schema they store
_STR = lambda t: any(getattr(pa.types, f"is_{k}", lambda _: False)(t)  # noqa: E731
                     for k in ("string", "large_string", "string_view"))
_BIN = lambda t: any(getattr(pa.types, f"is_{k}", lambda _: False)(t)  # noqa: E731
                     for k in ("binary", "large_binary", "binary_view"))
_SHAPE = lambda t: (pa.types.is_list(t) or pa.types.is_large_list(t)) and _INT(t.value_type)  # noqa: E731
COLUMN_TYPES = {
    "layer_name": (_STR, "string"), "shape": (_SHAPE, "list<int32>"), "dtype": (_STR, "string"),
    "data": (_BIN, "binary"), "num_params": (_INT, "int64"), "quant_type": (_STR, "string"),
    "scales": (_BIN, "binary"), "zero_points": (_BIN, "binary"), "quant_axis": (_INT, "int32"),
    "group_size": (_INT, "int32"), "chunk": (_INT, "int32"), "row_start": (_INT, "int64"),
}


def arrow_schema(version: int, chunked: bool = False) -> pa.Schema:
    """The Arrow schema our writer uses for V1 or V2 (what must be present is not null);
    ``chunked``: with the chunk columns (files holding a tensor stored as several rows)."""
    fields = [
        pa.field("layer_name", pa.string(), nullable=False),
        pa.field("shape", pa.list_(pa.field("element", pa.int32(), nullable=False)), nullable=False),
        pa.field("dtype", pa.string(), nullable=False),
        pa.field("data", pa.binary(), nullable=False),
        pa.field("num_params", pa.int64(), nullable=False),
    ]
    if version == 2:
        fields += [pa.field("quant_type", pa.string(), nullable=False), pa.field("scales", pa.binary()),
                   pa.field("zero_points", pa.binary()), pa.field("quant_axis", pa.int32()),
                   pa.field("group_size", pa.int32())]
    if chunked:
        fields += [pa.field("chunk", pa.int32()), pa.field("row_start", pa.int64())]
    return pa.schema(fields)


def schema_version(schema: pa.Schema, where: str) -> int:
    """1 or 2 from the columns ``schema`` has; a one-line error naming ``where`` when a
    column is missing or of the wrong type."""
    names = set(schema.names)
    missing = [c for c in V1_COLUMNS if c not in names]
    if missing:
        raise ConvcoreError(f"{where}: not a Parquet weight table: no column {', '.join(missing)} "
                            f"(schema V1 has {', '.join(V1_COLUMNS)})")
    present = [c for c in QUANT_COLUMNS if c in names]
    if present and len(present) != len(QUANT_COLUMNS):
        absent = [c for c in QUANT_COLUMNS if c not in names]
        raise ConvcoreError(f"{where}: has V2 column {present[0]} but not {', '.join(absent)}")
    version = 2 if present else 1
    chunked = [c for c in CHUNK_COLUMNS if c in names]
    if chunked and len(chunked) != len(CHUNK_COLUMNS):
        absent = [c for c in CHUNK_COLUMNS if c not in names]
        raise ConvcoreError(f"{where}: has column {chunked[0]} but not {', '.join(absent)}")
    for column in (V2_COLUMNS if version == 2 else V1_COLUMNS) + tuple(chunked):
        check, expected = COLUMN_TYPES[column]
        found = schema.field(column).type
        if not check(found):
            raise ConvcoreError(f"{where}: column {column} is {found}, expected {expected} (schema V{version})")
    return version


def has_chunks(schema: pa.Schema) -> bool:
    """Whether the file has the chunk columns (:func:`schema_version` checked them)."""
    return all(c in schema.names for c in CHUNK_COLUMNS)


def dtype_from_column(text: Any, where: str) -> str:
    """Canonical dtype (``"bf16"``) from the dtype column (``"bfloat16"``; short names
    and ``torch.`` spellings too, as other writers use them)."""
    key = str(text).strip().lower().removeprefix("torch.")
    try:
        return _FROM_NAME[key]
    except KeyError:
        raise ConvcoreError(f"{where}: unknown dtype {text!r}") from None


def checked_shape(value: Any, where: str) -> tuple[int, ...]:
    """The shape column's value as a tuple, refusing nulls, negatives and absurd ranks."""
    if value is None or len(value) > MAX_NDIM or any(d is None or d < 0 for d in value):
        raise ConvcoreError(f"{where}: bad shape {value!r}")
    return tuple(int(d) for d in value)


def code_array(layout: dict[str, Any]) -> str:
    """The name of a scheme's code array (``q``, ``weight``): what is not a scale."""
    names = [k for k in layout if k not in ("scales", "zero_points", "biases")]
    if len(names) != 1:
        raise ConvcoreError(f"scheme layout {sorted(layout)} has no single code array")
    return names[0]


def offset_array(layout: dict[str, Any]) -> str | None:
    """The layout array the zero_points column holds (``zero_points`` or ``biases``)."""
    return next((k for k in ("zero_points", "biases") if k in layout), None)


def quant_params(spec: Scheme, shape: tuple[int, ...], dtype: str) -> tuple[int, int, int]:
    """(quant_axis, group_size, number of scales) the scheme ``spec`` gives a tensor."""
    layout = spec.layout(shape, dtype)
    n_scales = math.prod(layout["scales"][1])
    probe = spec.layout((2, max(spec.block_size, 1)), "f32")  # per tensor: one scale for two rows
    if math.prod(probe["scales"][1]) == 1:
        return PER_TENSOR_AXIS, 0, n_scales
    numel = math.prod(shape)
    return 0, (numel // n_scales if n_scales else 0), n_scales


def packed_nbytes(spec: Scheme, shape: tuple[int, ...], dtype: str) -> int:
    """Bytes a quantized row holds before compression: codes, and scales and zero points
    as f32."""
    layout = spec.layout(shape, dtype)
    code = code_array(layout)
    return sum(math.prod(s) * (numpy_dtype(d).itemsize if k == code else 4) for k, (d, s) in layout.items())


def f32_bytes(array: np.ndarray) -> np.ndarray:
    """Scales or zero points as little-endian f32 (f16/bf16 widen exactly)."""
    return np.ascontiguousarray(array.astype("<f4", copy=False)).reshape(-1)


def restore_scales(raw: memoryview | bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """f32 bytes back to the layout's ``dtype`` and ``shape`` (caller checked the size)."""
    values = np.frombuffer(raw, dtype="<f4")
    target = numpy_dtype(dtype)
    if target != np.float32:
        values = values.astype(target)  # exact for values that came from that type
    return values.reshape(shape)


def itemsize(dtype: str) -> int:
    return numpy_dtype(dtype).itemsize


def little_endian(array: np.ndarray) -> np.ndarray:
    """``array`` as C-contiguous little-endian data (what the data column holds)."""
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array
