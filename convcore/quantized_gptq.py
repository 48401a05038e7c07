"""GPTQ and AWQ checkpoints as conversion sources (see :mod:`convcore.quantized`), and
the helpers every quantized layout shares: unpacking codes from int32 words, and the
lazy float32 :class:`TensorRef` that dequantizes a block of rows at a time.

Both keep a linear layer as the transpose of HF's ``weight`` (inputs along rows):

- GPTQ: ``qweight`` int32 ``(in * bits / 32, out)``, codes packed along the inputs, the
  code of input ``r * 32/bits + j`` in bits ``[j * bits, (j + 1) * bits)`` of row ``r``;
  ``qzeros`` int32 ``(groups, out * bits / 32)`` packed the same way along the outputs;
  ``scales`` ``(groups, out)``; ``g_idx`` ``(in,)`` the group of each input (act-order),
  else ``input // group_size``. ``W[o, i] = (q[i, o] - z[g[i], o]) * s[g[i], o]``, where
  the v1 checkpoint format (``checkpoint_format`` "gptq") stores ``z - 1`` (read back as
  the masked code plus one) and "gptq_v2" stores ``z``.
- AWQ (``version`` gemm): ``qweight`` int32 ``(in, out / 8)``, 4-bit codes packed along
  the outputs in AutoAWQ's order (nibble ``i`` of a word holds column ``[0, 2, 4, 6, 1,
  3, 5, 7][i]`` of its eight), ``qzeros`` ``(groups, out / 8)`` likewise, ``scales``
  ``(groups, out)``; groups of ``group_size`` inputs; same formula.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from .model import ConvcoreError, TensorRef, cast
from .rowblocks import row_block_loaders

#: AutoAWQ's gemm packing: nibble i of a word holds column AWQ_ORDER[i] of its eight
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: the nibble holding column j
AWQ_REVERSE = tuple(AWQ_ORDER.index(j) for j in range(8))
SCALE_DTYPES = ("f32", "f16", "bf16")
WORD_DTYPES = ("i32", "u32")

#: what a reader hands back: (anchor tensor name -> the dequantized X.weight replacing it,
#: names of companion tensors to drop, a short description for metadata)
Replaced = tuple[dict[str, TensorRef], set[str], str]


def unpack(words: np.ndarray, bits: int, count: int, axis: int = -1, per_word: int | None = None) -> np.ndarray:
    """The first ``count`` unsigned ``bits``-bit codes packed LSB first into the 32-bit
    ``words`` along ``axis``, as uint32. ``per_word`` codes share a word, at bits
    ``j * bits`` (default ``32 // bits``); ``per_word=0`` packs densely instead, code
    ``i`` at bit ``i * bits`` of the row, straddling two words where it falls across
    (compressed-tensors' layout for 3, 5, 6 and 7 bits; the same as the default when
    ``bits`` divides 32)."""
    w = np.moveaxis(np.asarray(words), axis, -1).view(np.uint32)
    mask = (1 << bits) - 1
    if per_word == 0:
        wide = w.astype(np.uint64)
        pair = wide.copy()
        pair[..., :-1] |= wide[..., 1:] << np.uint64(32)   # each word with the next above it
        pos = np.arange(count, dtype=np.uint64) * np.uint64(bits)
        picked = pair[..., (pos >> np.uint64(5)).astype(np.intp)] >> (pos & np.uint64(31))
        codes = (picked & np.uint64(mask)).astype(np.uint32)
    else:
        shifts = np.arange(per_word or 32 // bits, dtype=np.uint32) * np.uint32(bits)
        codes = ((w[..., None] >> shifts) & np.uint32(mask)).reshape(*w.shape[:-1], -1)[..., :count]
    return np.moveaxis(codes, -1, axis)


def streamed(name: str, shape: tuple[int, ...], rows: Callable[[int, int], np.ndarray], source: str,
             stored: str, parts: Iterable[TensorRef]) -> TensorRef:
    """A lazy float32 tensor ``name`` of ``shape`` whose rows ``[a, b)`` (of its 2-D view)
    ``rows(a, b)`` dequantizes: ``load`` and the writers' chunks work a block of rows at a
    time (:func:`convcore.row_block_loaders`); each block maps the slices of ``parts``
    (the stored tensors) it needs afresh, so nothing stays mapped between passes."""
    shape = tuple(int(d) for d in shape)
    load, pieces = row_block_loaders(shape, rows, "f32")
    return TensorRef(name, shape, "f32", load, source=source, stored=stored,
                     stored_nbytes=sum(p.file_nbytes for p in parts), chunk_loader=pieces)


def need(tensors: dict[str, TensorRef], name: str, anchor: TensorRef) -> TensorRef:
    """Tensor ``name``, which ``anchor`` cannot be read without; one line naming the file
    and ``anchor`` when it is missing."""
    ref = tensors.get(name)
    if ref is None:
        raise ConvcoreError(f"{anchor.source or anchor.name}: tensor {anchor.name!r} has no {name!r} beside it; "
                            "cannot dequantize it")
    return ref


def check(ref: TensorRef, dtypes: tuple[str, ...], shape: tuple[int, ...] | None = None, ndim: int | None = None) -> None:
    """One line naming ``ref``'s file when its type or shape is not what the layout has."""
    if (ref.dtype not in dtypes or (shape is not None and tuple(ref.shape) != tuple(shape))
            or (ndim is not None and len(ref.shape) != ndim)):
        want = f"{'/'.join(dtypes)}{list(shape) if shape is not None else ''}"
        if ndim is not None and shape is None:
            want += f" with {ndim} dimensions"
        raise ConvcoreError(f"{ref.source or ref.name}: tensor {ref.name!r} is {ref.dtype}{list(ref.shape)}, "
                            f"expected {want}")


def _groups(g_idx: TensorRef | None, n_in: int, group_size: int, n_groups: int) -> np.ndarray:
    """The group of each input: ``g_idx``'s values (checked against ``n_groups``), else
    ``input // group_size``."""
    if g_idx is None:
        return np.arange(n_in) // group_size
    g = np.asarray(g_idx.load()).astype(np.intp)
    if g.size and (g.min() < 0 or g.max() >= n_groups):
        bad = int(g.max()) if g.max() >= n_groups else int(g.min())
        raise ConvcoreError(f"{g_idx.source}: tensor {g_idx.name!r} names group {bad}, but there are {n_groups}")
    return g


def _int(qc: dict[str, Any], keys: tuple[str, ...], default: int, where: Path) -> int:
    value = next((qc[k] for k in keys if qc.get(k) is not None), default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConvcoreError(f"{where}: quantization_config.{keys[0]} is {value!r}, not an integer")
    return value


def gptq_tensors(qc: dict[str, Any], tensors: dict[str, TensorRef], where: Path) -> Replaced:
    """Every ``X.qweight`` of a GPTQ checkpoint as a float32 ``X.weight``."""
    bits = _int(qc, ("bits",), 4, where)
    if bits not in (2, 4, 8):
        raise ConvcoreError(f"{where}: gptq with {bits}-bit weights is not supported as a conversion source "
                            "(2, 4 and 8 bits are)")
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ConvcoreError(f"{where}: gptq checkpoint_format {fmt!r} is not supported as a conversion source "
                            "(gptq and gptq_v2 are)")
    if str(qc.get("pack_dtype") or "int32") != "int32":
        raise ConvcoreError(f"{where}: gptq pack_dtype {qc['pack_dtype']!r} is not supported (int32 is)")
    group_size = _int(qc, ("group_size",), 128, where)
    desc_act = bool(qc.get("desc_act"))
    per = 32 // bits
    offset = 1.0 if fmt == "gptq" else 0.0   # v1 stores z - 1
    replaced: dict[str, TensorRef] = {}
    dropped: set[str] = set()
    for name, qw in tensors.items():
        if not name.endswith(".qweight"):
            continue
        module = name[:-len(".qweight")]
        qz, sc = need(tensors, module + ".qzeros", qw), need(tensors, module + ".scales", qw)
        g_idx = tensors.get(module + ".g_idx") if not desc_act else need(tensors, module + ".g_idx", qw)
        check(qw, WORD_DTYPES, ndim=2)
        n_in, n_out = qw.shape[0] * per, qw.shape[1]
        check(sc, SCALE_DTYPES, ndim=2)
        n_groups = sc.shape[0]
        check(sc, SCALE_DTYPES, (n_groups, n_out))
        check(qz, WORD_DTYPES, (n_groups, -(-n_out // per)))
        size = group_size if group_size > 0 else n_in
        if g_idx is not None:
            check(g_idx, ("i32", "i64"), (n_in,))
        elif n_groups != -(-n_in // size):
            raise ConvcoreError(f"{sc.source}: tensor {sc.name!r} has {n_groups} groups; {n_in} inputs in groups "
                                f"of {size} make {-(-n_in // size)}")

        def rows(a: int, b: int, qw=qw, qz=qz, sc=sc, g_idx=g_idx, n_in=n_in, size=size, n_groups=n_groups) -> np.ndarray:
            q = unpack(qw.load()[:, a:b], bits, n_in, axis=0).astype(np.float32)        # (in, k)
            c0, c1 = a // per, -(-b // per)
            z = unpack(qz.load()[:, c0:c1], bits, (c1 - c0) * per, axis=1)[:, a - c0 * per:b - c0 * per]
            z = z.astype(np.float32) + np.float32(offset)                               # (groups, k)
            s = cast(np.asarray(sc.load()[:, a:b]), "f32")
            g = _groups(g_idx, n_in, size, n_groups)
            return np.ascontiguousarray(((q - z[g]) * s[g]).T)

        parts = [p for p in (qw, qz, sc, g_idx) if p is not None]
        replaced[name] = streamed(module + ".weight", (n_out, n_in), rows, qw.source,
                                  f"gptq-int{bits}-g{group_size}", parts)
        dropped.update(p.name for p in parts)
    description = (f"gptq {bits}-bit {f'g{group_size}' if group_size > 0 else 'per-channel'}"
                   f"{' desc_act' if desc_act else ''} {'sym' if qc.get('sym', True) else 'asym'}"
                   f"{' v2' if fmt == 'gptq_v2' else ''}")
    return replaced, dropped, description


def awq_tensors(qc: dict[str, Any], tensors: dict[str, TensorRef], where: Path) -> Replaced:
    """Every ``X.qweight`` of an AutoAWQ gemm checkpoint as a float32 ``X.weight``."""
    bits = _int(qc, ("bits", "w_bit"), 4, where)
    version = str(qc.get("version") or "gemm").lower()
    if version != "gemm" or bits != 4:
        raise ConvcoreError(f"{where}: awq version {version!r} with {bits}-bit weights is not supported as a "
                            "conversion source (gemm with 4 bits is)")
    group_size = _int(qc, ("group_size", "q_group_size"), 128, where)
    zero_point = bool(qc.get("zero_point", True))
    replaced: dict[str, TensorRef] = {}
    dropped: set[str] = set()
    for name, qw in tensors.items():
        if not name.endswith(".qweight"):
            continue
        module = name[:-len(".qweight")]
        sc = need(tensors, module + ".scales", qw)
        qz = need(tensors, module + ".qzeros", qw) if zero_point else tensors.get(module + ".qzeros")
        check(qw, WORD_DTYPES, ndim=2)
        check(sc, SCALE_DTYPES, ndim=2)
        n_in, (n_groups, n_out) = qw.shape[0], sc.shape
        size = group_size if group_size > 0 else n_in
        check(qw, WORD_DTYPES, (n_in, -(-n_out // 8)))
        if qz is not None:
            check(qz, WORD_DTYPES, (n_groups, -(-n_out // 8)))
        if n_groups != -(-n_in // size):
            raise ConvcoreError(f"{sc.source}: tensor {sc.name!r} has {n_groups} groups; {n_in} inputs in groups "
                                f"of {size} make {-(-n_in // size)}")

        def rows(a: int, b: int, qw=qw, qz=qz, sc=sc, n_in=n_in, size=size) -> np.ndarray:
            c0, c1 = a // 8, -(-b // 8)

            def columns(words: np.ndarray) -> np.ndarray:   # codes of outputs [a, b), in order
                slots = unpack(words, 4, (c1 - c0) * 8).reshape(len(words), c1 - c0, 8)
                return slots[:, :, AWQ_REVERSE].reshape(len(words), -1)[:, a - c0 * 8:b - c0 * 8].astype(np.float32)

            q = columns(qw.load()[:, c0:c1])                                                # (in, k)
            z = columns(qz.load()[:, c0:c1]) if qz is not None else np.float32(1 << (bits - 1))
            s = cast(np.asarray(sc.load()[:, a:b]), "f32")                                  # (groups, k)
            g = np.arange(n_in) // size
            zg = z[g] if qz is not None else z
            return np.ascontiguousarray(((q - zg) * s[g]).T)

        parts = [p for p in (qw, qz, sc) if p is not None]
        replaced[name] = streamed(module + ".weight", (n_out, n_in), rows, qw.source,
                                  f"awq-int{bits}-g{group_size}", parts)
        dropped.update(p.name for p in parts)
    description = f"awq {version} {bits}-bit g{group_size} {'asym' if zero_point else 'sym'}"
    return replaced, dropped, description


__all__ = ["AWQ_ORDER", "awq_tensors", "check", "gptq_tensors", "need", "streamed", "unpack"]
