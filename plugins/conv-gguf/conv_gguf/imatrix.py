"""Importance matrices as llama.cpp keeps them: the GGUF imatrix file ``llama-imatrix``
writes (and ``llama-quantize --imatrix`` reads), and its legacy ``.dat`` files.

A GGUF imatrix holds, for every matrix a matmul of the layers multiplied, ``<name>.in_sum2``
(F32, ggml shape ``[columns, n_mat]``: the sum over tokens of each input column's squared
activation, one row per expert for a stack of experts) and ``<name>.counts`` (F32 ``[1,
n_mat]``: the tokens each row summed), with ``general.type = imatrix``,
``imatrix.datasets``, ``imatrix.chunk_count`` and ``imatrix.chunk_size``. Quantization uses
the mean, sum / count (an expert no token reached: all ones).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from convcore import ConvcoreError

KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
# what llama-quantize records in a file quantized with an importance matrix
KEY_QUANTIZE_FILE = "quantize.imatrix.file"
KEY_QUANTIZE_DATASET = "quantize.imatrix.dataset"
KEY_QUANTIZE_ENTRIES = "quantize.imatrix.entries_count"
KEY_QUANTIZE_CHUNKS = "quantize.imatrix.chunks_count"


@dataclass
class Imatrix:
    """Sums of squared activations per matrix: ``sums[name]`` float32 ``(n_mat, columns)``
    and ``counts[name]`` ``(n_mat,)`` (tokens per row)."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False

    def importance(self, name: str) -> np.ndarray | None:
        """The per-column importance llama-quantize gives the quantizer for tensor
        ``name``: float32 ``(n_mat, columns)``, sum / count per row (ones where the count is
        0), or None when the file has no entry for it."""
        sums = self.sums.get(name)
        if sums is None:
            return None
        counts = np.asarray(self.counts[name], np.float32).reshape(-1, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(counts > 0, sums.astype(np.float32) / np.where(counts > 0, counts, 1), 1.0)
        return np.ascontiguousarray(out, dtype=np.float32)


def write_imatrix(path: Path, imatrix: Imatrix) -> None:
    """``imatrix`` as llama-imatrix's GGUF file, tensors in name order as it writes them."""
    writer = gguf.GGUFWriter(str(path), arch=None)
    try:
        writer.add_type("imatrix")
        writer.add_array(KEY_DATASETS, list(imatrix.datasets))
        writer.add_uint32(KEY_CHUNK_COUNT, int(imatrix.chunk_count))
        writer.add_uint32(KEY_CHUNK_SIZE, int(imatrix.chunk_size))
        for name in sorted(imatrix.sums):
            sums = np.ascontiguousarray(imatrix.sums[name], dtype=np.float32)
            counts = np.ascontiguousarray(imatrix.counts[name], dtype=np.float32).reshape(-1, 1)
            writer.add_tensor(f"{name}.in_sum2", sums.reshape(counts.shape[0], -1))
            writer.add_tensor(f"{name}.counts", counts)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def read_imatrix(path: Path) -> Imatrix:
    """An importance matrix from llama.cpp's GGUF imatrix or its legacy ``.dat`` file;
    a file that is neither, or a broken one, is one error line naming it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ConvcoreError(f"{path}: cannot read the importance matrix ({exc.strerror})") from None
    return check_finite(_read_gguf(path) if magic == b"GGUF" else _read_dat(path), path)


def _read_gguf(path: Path) -> Imatrix:
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf-py raises ValueError, struct.error, IndexError ...
        raise ConvcoreError(f"{path}: not a readable GGUF imatrix ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    fields = reader.fields
    kind = fields.get("general.type")
    if kind is not None and kind.contents() != "imatrix":
        raise ConvcoreError(f"{path}: a GGUF of type {kind.contents()!r}, not an importance matrix")
    if not all(k in fields for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE)):
        raise ConvcoreError(f"{path}: no imatrix metadata ({KEY_DATASETS}, {KEY_CHUNK_COUNT}, "
                            f"{KEY_CHUNK_SIZE}); not an importance matrix")
    out = Imatrix(datasets=list(fields[KEY_DATASETS].contents()),
                  chunk_count=int(fields[KEY_CHUNK_COUNT].contents()),
                  chunk_size=int(fields[KEY_CHUNK_SIZE].contents()))
    found: dict[str, dict[str, np.ndarray]] = {}
    for tensor in reader.tensors:
        for suffix in (".in_sum2", ".counts"):
            if tensor.name.endswith(suffix):
                if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise ConvcoreError(f"{path}: {tensor.name} is {tensor.tensor_type.name}, not F32")
                found.setdefault(tensor.name[:-len(suffix)], {})[suffix] = np.array(tensor.data, np.float32)
    if not found:
        raise ConvcoreError(f"{path}: no importance entries (no <name>.in_sum2 tensors)")
    for name, pair in sorted(found.items()):
        if len(pair) != 2:
            raise ConvcoreError(f"{path}: {name} has {'sums' if '.in_sum2' in pair else 'counts'} "
                                "but not the other")
        counts = pair[".counts"].reshape(-1)
        sums = pair[".in_sum2"]
        if sums.size == 0 or sums.size % counts.size:
            raise ConvcoreError(f"{path}: {name}: {sums.size} sums do not split into {counts.size} rows")
        out.sums[name] = sums.reshape(counts.size, -1)
        out.counts[name] = np.rint(counts).astype(np.float32)
    return out


def _read_dat(path: Path) -> Imatrix:
    """llama.cpp's legacy format: int32 n; per entry int32 len, name, int32 ncall, int32 nval,
    float[nval] (the mean times ncall); then optionally int32 chunks, int32 len, dataset."""
    data = path.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ConvcoreError(f"{path}: not an importance matrix (neither GGUF nor a complete "
                                f"llama.cpp .dat file: it ends at byte {len(data)})")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n,) = take("<i")
    if n < 1 or n > 1_000_000:
        raise ConvcoreError(f"{path}: not an importance matrix (neither GGUF nor llama.cpp .dat: "
                            f"{n} entries)")
    out = Imatrix(legacy=True)
    for i in range(n):
        (length,) = take("<i")
        if length < 1 or length > 4096:
            raise ConvcoreError(f"{path}: entry {i + 1}: a name of {length} bytes; not an importance matrix")
        name = take(f"<{length}s")[0].decode("utf-8", "replace")
        ncall, nval = take("<ii")
        if nval < 1:
            raise ConvcoreError(f"{path}: entry {name!r} has {nval} values")
        start = pos
        take(f"<{4 * nval}x")   # (checks the values are all there)
        values = np.frombuffer(data, np.float32, nval, start).copy()
        # stored as the mean times ncall: sums/counts with counts = ncall gives the mean
        out.sums[name] = values.reshape(1, -1)
        out.counts[name] = np.array([max(ncall, 0)], np.float32)
        if ncall <= 0:   # llama.cpp then takes the values as they are
            out.counts[name] = np.ones(1, np.float32)
    if pos + 4 <= len(data):
        (out.chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (length,) = take("<i")
            if 0 < length <= len(data) - pos:
                out.datasets.append(take(f"<{length}s")[0].decode("utf-8", "replace"))
    return out


def importance_for(imatrix: Imatrix | None, name: str, shape: tuple[int, ...], gtype: gguf.GGMLQuantizationType,
                   n_mat: int, source: object, notes: list[str], quant: str | None = None) -> np.ndarray | None:
    """The importance the quantizer of tensor ``name`` gets, as llama-quantize finds it: None
    for float types and tensors without an entry; an entry of another size is an error
    (except for token_embd, which llama.cpp quantizes without it). A type llama.cpp makes only
    with an importance matrix, missing one, is an error that says how to make one."""
    T = gguf.GGMLQuantizationType
    if gtype in (T.F32, T.F16, T.BF16):
        return None
    from .mixes import NEEDS_IMATRIX

    found = imatrix.importance(name) if imatrix is not None else None
    if found is not None and found.size != shape[-1] * n_mat:
        if name not in ("token_embd.weight", "per_layer_token_embd.weight"):
            raise ConvcoreError(f"{source}: the importance matrix has {found.size} values for {name}, "
                                f"which needs {shape[-1] * n_mat}: it was made for another model")
        notes.append(f"{name}: the importance matrix does not fit it ({found.size} values); "
                     "quantized without")
        found = None
    # (q2_K needs one only in llama.cpp's q2_k_s mix)
    needs = gtype in NEEDS_IMATRIX or (gtype == T.Q2_K and quant == "q2_k_s")
    if found is None and needs and name not in (
            "token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        where = f"{source} has no entry for it" if imatrix is not None else "none was given"
        raise ConvcoreError(f"{name}: {gtype.name.lower()} needs an importance matrix and {where}; "
                            "make one with `convcore imatrix SRC --text FILE -o imatrix.gguf` "
                            "and pass --imatrix imatrix.gguf")
    return None if found is None else found.reshape(n_mat, shape[-1])


def add_imatrix_keys(writer: gguf.GGUFWriter, imatrix: Imatrix, path: str) -> None:
    """The keys llama-quantize records in a file quantized with an importance matrix
    (strings cut to 127 bytes as its overrides are)."""
    writer.add_string(KEY_QUANTIZE_FILE, path.encode()[:127].decode("utf-8", "ignore"))
    if imatrix.datasets:
        writer.add_string(KEY_QUANTIZE_DATASET, imatrix.datasets[0].encode()[:127].decode("utf-8", "ignore"))
    writer.add_uint32(KEY_QUANTIZE_ENTRIES, len(imatrix.sums))
    if imatrix.chunk_count > 0:
        writer.add_uint32(KEY_QUANTIZE_CHUNKS, int(imatrix.chunk_count))


def check_finite(imatrix: Imatrix, path: Path) -> Imatrix:
    for name, sums in imatrix.sums.items():
        if not np.isfinite(sums).all():
            raise ConvcoreError(f"{path}: the importance matrix has non-finite values for {name}")
    return imatrix
