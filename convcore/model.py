"""The intermediate representation every loader produces and every writer consumes.

Loading never reads tensor data: a :class:`TensorRef` knows its name, shape and dtype
and reads its array only when :meth:`TensorRef.load` is called. Writers pull one tensor
at a time, so a conversion holds a few tensors in memory, never the whole model.
"""
from __future__ import annotations

import math
import mmap
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import ml_dtypes
import numpy as np


class ConvcoreError(Exception):
    """An error a user caused or can fix: shown as one ``error: ...`` line, no traceback."""


def first_line(exc: BaseException) -> str:
    """The first non-blank line of ``exc``'s message, or its type's name when it has none:
    what a plugin puts after "file: " in a one-line error."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0].strip() or type(exc).__name__


def one_line(exc: BaseException) -> str:
    """``exc`` as one line for a report: a convcore error's message, else the exception's
    type and the first line of its message."""
    if isinstance(exc, ConvcoreError):
        return " ".join(str(exc).split())
    first = (str(exc).strip().splitlines() or [""])[0].strip()
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


# Canonical dtype names used across the project (short, as llama.cpp and MLX spell them).
DTYPES: dict[str, np.dtype] = {
    "f64": np.dtype(np.float64),
    "f32": np.dtype(np.float32),
    "f16": np.dtype(np.float16),
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "f8_e4m3": np.dtype(ml_dtypes.float8_e4m3fn),
    "f8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "i64": np.dtype(np.int64),
    "i32": np.dtype(np.int32),
    "i16": np.dtype(np.int16),
    "i8": np.dtype(np.int8),
    "u64": np.dtype(np.uint64),
    "u32": np.dtype(np.uint32),
    "u16": np.dtype(np.uint16),
    "u8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}
_NAME_OF = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("f64", "f32", "f16", "bf16", "f8_e4m3", "f8_e5m2")


def dtype_name(dtype: Any) -> str:
    """Canonical name (``"f32"``, ``"bf16"``, ...) of a numpy dtype or a canonical name."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return dtype
    try:
        return _NAME_OF[np.dtype(dtype)]
    except (KeyError, TypeError) as exc:
        raise ConvcoreError(f"unsupported dtype {dtype!r}") from exc


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype for a canonical name; bf16 is ``ml_dtypes.bfloat16``."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ConvcoreError(
            f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}"
        ) from None


def cast(array: np.ndarray, dtype: str) -> np.ndarray:
    """Cast ``array`` to the canonical ``dtype`` with round-to-nearest-even.

    Float-to-float casts go through numpy/ml_dtypes, which round as torch does, so a
    converted model matches ``model.to(dtype)`` bit for bit. Returns ``array`` itself
    when it already has that dtype.
    """
    target = numpy_dtype(dtype)
    if array.dtype == target:
        return array
    src = dtype_name(array.dtype)
    if src == "bf16":
        # bf16 is the top half of an f32: widening is a 16-bit shift (exact, and ~10x
        # faster than ml_dtypes' element-wise astype)
        if dtype != "f32":
            # one rounding from the exact value: what going through f32 gives, without it
            return array.astype(target)
        wide = np.ascontiguousarray(array).view(np.uint16).astype(np.uint32)
        wide <<= np.uint32(16)
        return wide.view(np.float32)
    if src in ("f8_e4m3", "f8_e5m2") or dtype in ("bf16", "f8_e4m3", "f8_e5m2"):
        # ml_dtypes casts exactly through f32 (bf16 and f8 fit in f32 without loss).
        return array.astype(np.float32).astype(target)
    with np.errstate(over="ignore", invalid="ignore"):  # out of range: Inf, as a cast gives
        return array.astype(target)


def cast_chunks(array: np.ndarray, dtype: str, chunk_elems: int = 1 << 22) -> Iterator[np.ndarray]:
    """:func:`cast` in flat, C-ordered pieces of at most ``chunk_elems`` elements, so a
    writer can stream a cast tensor without holding it (or an f32 copy of it) whole.
    When ``array`` is in a read-only file mapping, the pages of the pieces already taken
    leave the resident set (one piece behind: a writer may still be writing the last one
    while the next is made), so a pass over the tensor holds about two pieces of it."""
    flat = np.ascontiguousarray(array).reshape(-1)
    release = page_releaser(flat)
    behind = None
    for start in range(0, max(flat.size, 1), chunk_elems):
        piece = flat[start:start + chunk_elems]
        yield cast(piece, dtype)
        if behind is not None:
            release(behind)
        behind = piece
    if behind is not None:
        release(behind)


#: the exponent bits of each float type, seen as unsigned integers: all set = Inf or NaN
_EXPONENT_MASKS = {"f64": (np.uint64, 0x7FF0000000000000), "f32": (np.uint32, 0x7F800000),
                   "f16": (np.uint16, 0x7C00), "bf16": (np.uint16, 0x7F80)}


def has_nonfinite(array: np.ndarray, chunk_elems: int = 1 << 20) -> bool:
    """Whether a float array holds NaN or Inf, read in pieces (no full-size temporary);
    other dtypes never do. A value is NaN or Inf when its bits without the sign reach the
    all-ones exponent: one AND into a reused buffer and one max per piece (about 2 ms per
    4M values here)."""
    found = _EXPONENT_MASKS.get(dtype_name(array.dtype)) if array.dtype.kind in "fV" else None
    if found is None:
        return False
    uint, mask = found
    flat = array.reshape(-1).view(uint)
    if not flat.size:
        return False
    limit = uint(mask)
    magnitude = uint(np.iinfo(uint).max >> 1)  # every bit but the sign
    buf = np.empty(min(chunk_elems, flat.size), uint)
    release = page_releaser(flat)
    for start in range(0, flat.size, chunk_elems):
        piece = flat[start:start + chunk_elems]
        bits = buf[:piece.size]
        np.bitwise_and(piece, magnitude, out=bits)
        if bits.max() >= limit:
            return True
        release(piece)
    return False


def page_releaser(array: np.ndarray) -> Callable[[np.ndarray], None]:
    """For an array in a read-only memory-mapped file (what loaders hand out): a function
    that drops the pages of a piece already read (a view into ``array``) from this
    process's resident set; they stay in the page cache, so reading them again costs no
    disk. A pass over a whole tensor then costs no more resident memory than a piece of it.
    For any other array the function does nothing."""
    base = array
    while base is not None and not isinstance(base, np.memmap):
        base = getattr(base, "base", None)  # an array over another object ends the chain
    mm = getattr(base, "_mmap", None)
    # read-only maps only: dropping pages of a copy-on-write map would undo its changes
    if mm is None or getattr(base, "mode", None) != "r" or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return lambda piece: None
    try:
        origin = np.frombuffer(mm, dtype=np.uint8).ctypes.data
    except (TypeError, ValueError):
        return lambda piece: None
    page = mmap.PAGESIZE

    def release(piece: np.ndarray) -> None:
        first = piece.ctypes.data - origin
        last = first + piece.nbytes
        first = -(-first // page) * page  # whole pages inside the piece only
        last = last // page * page
        if last > first:
            try:
                mm.madvise(mmap.MADV_DONTNEED, first, last - first)
            except (OSError, ValueError):
                pass

    return release


@dataclass
class TensorRef:
    """A tensor known by name, shape and dtype whose data is read on demand.

    ``loader`` returns the array (usually a view of a memory map); it is called once per
    :meth:`load`, never at construction.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    loader: Callable[[], np.ndarray] = field(repr=False)
    source: str = ""  # the file the data lives in, for error messages
    stored: str = ""  # the type in the file when load() converts it (e.g. "q4_k", "int4-g64")
    stored_nbytes: int = 0  # bytes in the file when they differ from shape x dtype (packed)
    #: optional ``cast_loader(dtype)``: the tensor as another float type straight from the
    #: file, equal to ``cast(load(), dtype)`` (a quantized tensor dequantized to f16, say)
    cast_loader: Callable[[str], np.ndarray] | None = field(default=None, repr=False)
    #: optional ``chunk_loader(dtype)``: the tensor as flat C-order pieces of the float
    #: ``dtype``, which joined equal ``load_as(dtype)`` (a reader that dequantizes a slice
    #: at a time hands them out, so a writer streams the tensor without holding it)
    chunk_loader: Callable[[str], Iterable[np.ndarray]] | None = field(default=None, repr=False)
    #: for a tensor made by stacking others (a layer's experts): those tensors, in order;
    #: ``load()`` stacks them, a streaming writer reads them one at a time
    parts: tuple["TensorRef", ...] = field(default=(), repr=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the array :meth:`load` returns."""
        return self.numel * numpy_dtype(self.dtype).itemsize

    @property
    def file_nbytes(self) -> int:
        """Bytes the tensor takes where it is stored (packed size for quantized ones)."""
        return self.stored_nbytes or self.nbytes

    def load(self) -> np.ndarray:
        """Read the tensor: an array of ``shape`` and ``dtype`` (bf16 stays bf16)."""
        try:
            array = self.loader()
        except (ConvcoreError, MemoryError):
            raise
        except Exception as exc:  # the file's bytes disagree with its header
            raise ConvcoreError(f"{self.source or self.name}: cannot read tensor {self.name!r}: "
                                f"{one_line(exc)}") from exc
        if tuple(array.shape) != tuple(self.shape) or dtype_name(array.dtype) != self.dtype:
            raise ConvcoreError(
                f"{self.source or self.name}: tensor {self.name!r} read as "
                f"{dtype_name(array.dtype)}{list(array.shape)}, expected {self.dtype}{list(self.shape)}"
            )
        return array

    def load_as(self, dtype: str | None) -> np.ndarray:
        """The tensor as the canonical ``dtype`` (None: as stored): what
        ``cast(load(), dtype)`` gives, through the ``cast_loader`` when there is one."""
        if not dtype or dtype == self.dtype:
            return self.load()
        if self.cast_loader is None or dtype not in FLOAT_DTYPES or self.dtype not in FLOAT_DTYPES:
            return cast(self.load(), dtype)
        try:
            array = self.cast_loader(dtype)
        except (ConvcoreError, MemoryError):
            raise
        except Exception as exc:
            raise ConvcoreError(f"{self.source or self.name}: cannot read tensor {self.name!r}: "
                                f"{one_line(exc)}") from exc
        if tuple(array.shape) != tuple(self.shape) or dtype_name(array.dtype) != dtype:
            raise ConvcoreError(
                f"{self.source or self.name}: tensor {self.name!r} read as "
                f"{dtype_name(array.dtype)}{list(array.shape)}, expected {dtype}{list(self.shape)}")
        return array

    def load_chunks(self, dtype: str | None = None) -> Iterable[np.ndarray]:
        """The tensor as flat C-order pieces of ``dtype`` (None: as stored), for writers
        that stream: the reader's own pieces where it has a ``chunk_loader``; else the
        stored tensor cast a piece at a time (:func:`cast_chunks`: a mapped tensor's pages
        go behind), or where the reader makes ``dtype`` itself (a ``cast_loader``), pieces
        of that. The tensor is opened at this call, so a thread can do it ahead."""
        out = dtype or self.dtype
        floats = out in FLOAT_DTYPES and self.dtype in FLOAT_DTYPES
        if self.chunk_loader is not None and floats:
            return self._checked_chunks(out)
        if out != self.dtype and self.cast_loader is not None and floats:
            return cast_chunks(self.load_as(dtype), out)
        return cast_chunks(self.load_as(None), out)

    def _checked_chunks(self, dtype: str) -> Iterator[np.ndarray]:
        where = self.source or self.name
        count = 0
        pieces = iter(self.chunk_loader(dtype))  # type: ignore[misc]
        while True:
            try:
                piece = next(pieces, None)
            except (ConvcoreError, MemoryError):
                raise
            except Exception as exc:  # the file's bytes disagree with its header
                raise ConvcoreError(f"{where}: cannot read tensor {self.name!r}: {one_line(exc)}") from exc
            if piece is None:
                break
            if dtype_name(piece.dtype) != dtype or piece.ndim != 1:
                raise ConvcoreError(f"{where}: tensor {self.name!r} read as a piece of "
                                    f"{dtype_name(piece.dtype)}{list(piece.shape)}, expected flat {dtype}")
            count += piece.size
            yield piece
        if count != self.numel:
            raise ConvcoreError(f"{where}: tensor {self.name!r} read as {count} values, "
                                f"expected {self.numel} for shape {list(self.shape)}")

    def with_loader(self, loader: Callable[[], np.ndarray], **changes: Any) -> "TensorRef":
        """A copy with another loader (and optionally another name/shape/dtype)."""
        fields = dict(name=self.name, shape=self.shape, dtype=self.dtype, source=self.source,
                      stored=self.stored, stored_nbytes=self.stored_nbytes)
        fields.update(changes)
        return TensorRef(loader=loader, **fields)


@dataclass
class QuantizedTensor:
    """A tensor in a quantization scheme's canonical packed layout.

    ``data`` holds the scheme's named arrays: ``{"blocks": uint8}`` for GGUF block types
    (ggml's byte layout), ``{"weight": uint32, "scales", "biases"}`` for affine groups
    (MLX's layout), ``{"q", "scales", "zero_points"}`` for per-row schemes. ``shape`` is the
    logical (unquantized) shape.
    """

    name: str
    scheme: str
    shape: tuple[int, ...]
    data: dict[str, np.ndarray]
    dequantizer: Callable[["QuantizedTensor"], np.ndarray] = field(repr=False)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.data.values())

    def dequantize(self) -> np.ndarray:
        """Float32 array of ``shape`` that the packed data stands for."""
        return self.dequantizer(self)


@dataclass
class Model:
    """A model as the pipeline sees it.

    ``tensors`` is ordered and keyed by HF names (the canonical names); ``config`` is the
    HF ``config.json`` dict; ``tokenizer`` maps HF tokenizer file names to their bytes;
    ``metadata`` holds name, license, source and anything ``--metadata`` adds;
    ``companions`` maps relative POSIX paths (``README.md``, ``1_Pooling/config.json``)
    to the bytes of the files of the source directory that are neither weights, config
    nor tokenizer files, carried over unchanged (see ``convcore.read_companions`` and
    ``convcore.write_companions``). A reader that can describe a file but not map it to
    HF names (an architecture it does not know) sets ``metadata["unmapped"]`` to the
    reason: ``inspect`` shows such a model, ``convert`` refuses it with that reason.
    """

    arch: str
    config: dict[str, Any]
    tensors: dict[str, TensorRef]
    tokenizer: dict[str, bytes] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    format: str = ""
    # files of the source directory that are neither weights, config nor tokenizer
    # files, carried over unchanged: relative POSIX path -> bytes
    companions: dict[str, bytes] = field(default_factory=dict)

    def __iter__(self) -> Iterator[TensorRef]:
        return iter(self.tensors.values())

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def stack_tensors(name: str, found: dict[int, TensorRef], count: int, source: str = "") -> TensorRef:
    """One tensor ``name`` of shape ``(count, *part)`` stacking ``found`` (index -> tensor,
    e.g. a layer's experts), its parts kept in :attr:`TensorRef.parts`; one-line errors
    when an index is missing or the parts differ in shape or type."""
    if sorted(found) != list(range(count)):
        missing = sorted(set(range(count)) - set(found))
        raise ConvcoreError(f"{source}: {name} stacks {sorted(found)[:8]}..., expected {count} "
                            f"(missing {missing[:8]})")
    parts = tuple(found[i] for i in range(count))
    first = parts[0]
    odd = next((p for p in parts if (tuple(p.shape), p.dtype) != (tuple(first.shape), first.dtype)), None)
    if odd is not None:
        raise ConvcoreError(f"{odd.source or source}: tensor {odd.name!r} is {odd.dtype}{list(odd.shape)}, "
                            f"the others stacked into {name} {first.dtype}{list(first.shape)}")
    return TensorRef(name, (count, *first.shape), first.dtype,
                     lambda: np.stack([p.load() for p in parts]), source=first.source, parts=parts)


def arch_of(config: dict[str, Any]) -> str:
    """Canonical architecture name from an HF config (``model_type``, else the class)."""
    model_type = config.get("model_type")
    if model_type:
        return str(model_type)
    archs = config.get("architectures") or []
    if archs:
        return str(archs[0]).removesuffix("ForCausalLM").lower()
    return "unknown"
