"""Format ``npz``: the APL per-row layout.

A directory holding ``<name>_quantized_q<B>.npz``, ``<name>_manifest_q<B>.json`` and the
model's config.json and tokenizer files. Every tensor is in the npz: 2-D float tensors
quantized with a per-row scheme, everything else (norms, biases, 1-D) as float32. The
manifest lists each weight with its shape, bit width and the npz members holding its
codes (``q``), scales (``q_scales``) and zero points (``q_zero_point``) — plain member
names, never paths — plus the relative error measured when it was written.

Relative error, per tensor: ||x - dequant(x)|| / ||x|| (relative RMSE). On gaussian
weights the least-squares codes give about 0.6 % (8 bits), 10 % (4), 34 % (2) and 60 %
(1), min/max codes 0.65 %, 11 %, 55 % and 99 %; validation holds each tensor to 2 %,
15 %, 60 % and 100 %, so a wrong code, scale or packing (errors of 100 % and more) shows
up as a failure.

Large tensors never sit whole in memory: the writer quantizes a block of rows at a time
and streams the codes into their member (:mod:`.npz_quant`); the reader reads the codes
from the zip and dequantizes them a block of rows at a time (:mod:`.npz_members`).
"""
from __future__ import annotations

import json
import math
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

import convcore
from convcore import ConvcoreError, Model, TensorRef

from .npz_members import MemberRows, check_member, member_writer, read_member, write_member
from .npz_quant import ERROR_ROWS_ELEMENTS, relative_error_rows, write_quantized  # noqa: F401

FORMAT_VERSION = 1
SCHEMES = ("int1-row", "int2-row", "int4-row", "int8-row", "int8-row-sym", "int8-tensor")
TOLERANCE = {8: 0.02, 4: 0.15, 2: 0.60, 1: 1.00}
DEFAULT_SCHEME = "int8-row"
PLAIN = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _bits(scheme: str) -> int:
    return int(re.match(r"int(\d+)", scheme).group(1))


def _manifests(path: Path) -> list[Path]:
    return sorted(path.glob("*_manifest_q*.json")) if path.is_dir() else []


def detect(path: Path) -> int:
    return 30 if _manifests(Path(path)) else 0


def register_npz(register: Callable[..., None]) -> None:
    register(convcore.Format(name="npz", description="APL per-row quantized NPZ + manifest",
                             directory=True, schemes=SCHEMES, detect=detect,
                             outputs=("*_quantized_q*.npz", "*_manifest_q*.json", "config.json"),
                             options=(
                                 convcore.Option("dry_run", "bool", False,
                                                 "print each tensor's name, shape and scheme; write nothing"),
                                 convcore.Option("row_search", "choice", "mse",
                                                 "how int{1,2,4,8}-row picks scale and zero point: "
                                                 "least squares (mse) or min/max",
                                                 choices=("mse", "minmax")),
                                 convcore.Option("manifest", "choice", "convcore",
                                                 "manifest shape: convcore's (format_version 1) or APL's own "
                                                 "(format_version \"2\": family/hidden_dim/context_length, "
                                                 "per-weight quantization, .npy member names)",
                                                 choices=("convcore", "apl")))))


def relative_error(x: np.ndarray, y: np.ndarray) -> float:
    """||x - y|| / ||x|| over the whole tensor (0 when both are zero)."""
    x2 = np.asarray(x, np.float32).reshape(-1)
    diff = float(np.linalg.norm(x2 - np.asarray(y, np.float32).reshape(-1)))
    norm = float(np.linalg.norm(x2))
    return diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))


def _model_block(model: Model) -> dict[str, Any]:
    c = model.config
    keys = {"hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
            "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads",
            "intermediate_size": "intermediate_size", "vocab_size": "vocab_size",
            "max_position_embeddings": "max_position_embeddings", "rms_norm_eps": "rms_norm_eps",
            "rope_theta": "rope_theta", "head_dim": "head_dim",
            "tie_word_embeddings": "tie_word_embeddings"}
    block = {"arch": model.arch, "name": model.metadata.get("name") or Path(model.source).name}
    block.update({out: c[k] for k, out in keys.items() if k in c})
    return block


def _write_plain(zf: zipfile.ZipFile, member: str, ref: TensorRef, where: str) -> None:
    """A tensor stored as is (floats as float32), a piece at a time (a scalar whole: numpy
    writes it as shape (1,))."""
    floats = ref.dtype in convcore.FLOAT_DTYPES
    if not ref.shape:
        data = ref.load()
        write_member(zf, member, convcore.cast(data, "f32") if floats else data)
        return
    dtype = convcore.numpy_dtype("f32" if floats else ref.dtype)
    with member_writer(zf, member, dtype, tuple(ref.shape), where) as writer:
        for piece in ref.load_chunks("f32" if floats else None):
            writer.write(piece)


@convcore.hookimpl
def convcore_write(model: Model, path: Path, fmt: str, options: dict[str, Any],
                   progress: Callable[[str], None]) -> Path | None:
    if fmt != "npz":
        return None
    scheme = options.get("quant") or DEFAULT_SCHEME
    search = options.get("row_search") or "mse"
    if scheme not in SCHEMES:
        raise ConvcoreError(f"npz stores per-row schemes ({', '.join(SCHEMES)}), not {scheme!r}")
    bits = _bits(scheme)
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", str(model.metadata.get("name") or Path(model.source).name or "model"))
    if options.get("dry_run"):
        for ref in model.tensors.values():
            kind = scheme if len(ref.shape) == 2 and ref.dtype in convcore.FLOAT_DTYPES else "f32"
            print(f"{ref.name}\t{list(ref.shape)}\t{kind}")
        return path
    path.mkdir(parents=True)
    spec = convcore.get_registry().scheme(scheme)
    npz_name = f"{name}_quantized_q{bits}.npz"
    weights = []
    with zipfile.ZipFile(path / npz_name, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for i, ref in enumerate(model.tensors.values()):
            entry: dict[str, Any] = {"name": ref.name, "shape": list(ref.shape)}
            if len(ref.shape) == 2 and ref.dtype in convcore.FLOAT_DTYPES:
                zero_points = "zero_points" in spec.layout(tuple(ref.shape), "f32")
                entry.update(bit_width=bits, scheme=scheme, q=f"w{i}_q", q_scales=f"w{i}_scales",
                             q_zero_point=f"w{i}_zp" if zero_points else None, rel_error=None)
                entry["rel_error"] = write_quantized(zf, ref, scheme, search, entry, str(path / npz_name))
            else:
                entry.update(bit_width=32, scheme="f32", q=f"w{i}", q_scales=None, q_zero_point=None,
                             dtype=ref.dtype)
                _write_plain(zf, entry["q"], ref, str(path / npz_name))
            weights.append(entry)
            progress(ref.name)
    manifest = {
        "format_version": FORMAT_VERSION,
        "model": {**_model_block(model), **({"metadata": {str(k): str(v) for k, v in
                                                          options["metadata"].items()}}
                                            if options.get("metadata") else {})},
        "file": npz_name,
        "quantization": {"type": "perrow_int", "bits": bits, "scheme": scheme,
                         "method": "symmetric-absmax" if scheme.startswith("int8-") and scheme != "int8-row"
                         else f"asymmetric-{'least-squares' if search == 'mse' else 'minmax'}"},
        "weights": weights,
    }
    if options.get("manifest") == "apl":
        manifest = apl_manifest(manifest, model, dict(options.get("metadata") or {}))
    (path / f"{name}_manifest_q{bits}.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (path / "config.json").write_text(json.dumps(model.config, indent=2) + "\n")
    convcore.write_tokenizer_files(path, model)
    return path


def apl_manifest(ours: dict[str, Any], model: Model, metadata: dict[str, Any]) -> dict[str, Any]:
    """Our manifest in the shape APL writes: format_version "2", ``model`` with ``family``,
    ``hidden_dim`` and ``context_length``, a top-level ``metadata``, and each weight's
    ``quantization {type, bits, method}`` with member names carrying ``.npy``."""
    c = model.config
    block = {"family": model.arch, "name": ours["model"].get("name"), "hidden_dim": c.get("hidden_size"),
             "num_layers": c.get("num_hidden_layers"), "context_length": c.get("max_position_embeddings"),
             "vocab_size": c.get("vocab_size")}
    method = ours["quantization"]["method"]
    weights = []
    for entry in ours["weights"]:
        quantized = entry["bit_width"] != 32
        out = {"name": entry["name"], "shape": entry["shape"],
               "quantization": ({"type": "perrow_int", "bits": entry["bit_width"], "method": method} if quantized
                                else {"type": "float32", "bits": 32, "method": "none"})}
        for key in ("q", "q_scales", "q_zero_point"):
            out[key] = f"{entry[key]}.npy" if entry.get(key) else None
        weights.append(out)
    return {"format_version": "2", "model": {k: v for k, v in block.items() if v is not None},
            "metadata": {str(k): str(v) for k, v in metadata.items()}, "file": ours["file"],
            "quantization": ours["quantization"], "weights": weights}


def _normalised(entry: Any) -> Any:
    """A weights entry in this reader's terms: APL's own manifests (format_version "2") give
    ``quantization: {type, bits, method}`` instead of ``bit_width`` / ``scheme`` and member
    names with their ``.npy`` suffix."""
    if not isinstance(entry, dict):
        return entry
    out = dict(entry)
    quant = out.get("quantization")
    if "bit_width" not in out and isinstance(quant, dict):
        floats = str(quant.get("type", "")).startswith("float") or quant.get("bits") == 32
        out["bit_width"] = 32 if floats else quant.get("bits")
        if not floats and "scheme" not in out:
            sym = "symmetric" in str(quant.get("method", "")) and "asymmetric" not in str(quant.get("method", ""))
            out["scheme"] = "int8-row-sym" if sym and quant.get("bits") == 8 else f"int{quant.get('bits')}-row"
    for key in ("q", "q_scales", "q_zero_point"):
        if isinstance(out.get(key), str):
            out[key] = out[key].removesuffix(".npy")
    return out


def _read_manifest(path: Path) -> tuple[Path, dict[str, Any]]:
    manifests = _manifests(path)
    if len(manifests) != 1:
        raise ConvcoreError(f"{path}: expected one *_manifest_q<B>.json, found {len(manifests)}")
    manifest = convcore.read_json(manifests[0])
    if not isinstance(manifest, dict) or not isinstance(manifest.get("weights"), list):
        raise ConvcoreError(f"{manifests[0]}: no weights list")
    npz_name = manifest.get("file") or manifests[0].name.replace("_manifest_", "_quantized_").replace(".json", ".npz")
    manifest["weights"] = [_normalised(e) for e in manifest["weights"]]
    for entry in manifest["weights"]:
        if not isinstance(entry, dict):
            raise ConvcoreError(f"{manifests[0]}: a weights entry is {type(entry).__name__}, not an object")
        shape, bits = entry.get("shape"), entry.get("bit_width")
        if (not isinstance(entry.get("name"), str) or not isinstance(shape, list)
                or not all(type(d) is int and d >= 0 for d in shape)
                or math.prod(shape) >= 2**62 or bits not in (32, *TOLERANCE)
                or (bits != 32 and len(shape) != 2)):
            raise ConvcoreError(f"{manifests[0]}: weight {entry.get('name')!r}: name, shape "
                                f"{shape!r} or bit_width {bits!r} is not valid")
        for key in ("q", "q_scales", "q_zero_point"):
            member = entry.get(key)
            if member is not None and (not isinstance(member, str) or not PLAIN.match(member)):
                raise ConvcoreError(f"{manifests[0]}: weight {entry.get('name')!r} has {key} "
                                    f"{member!r}, which is not a plain member name")
    if not isinstance(npz_name, str) or not PLAIN.match(npz_name) or not (path / npz_name).is_file():
        raise ConvcoreError(f"{manifests[0]}: npz file {npz_name!r} is missing or not a plain name")
    return convcore.inside_model(path / npz_name, path), manifest


class _Pass:
    """One pass over a weight's members, its rows handed out in order: the codes (or the
    stored floats) read from the zip a block of rows at a time, scales and zero points
    (one value a row) whole. Opened at the start of the pass, closed at its end."""

    def __init__(self, npz: Path, members: dict[str, str | None], entry: dict[str, Any]):
        self.npz, self.members, self.entry = npz, members, entry
        self.shape = tuple(entry["shape"])
        self.n_rows = math.prod(self.shape[:-1]) if len(self.shape) > 1 else 1
        self.zf: zipfile.ZipFile | None = None
        self.q: MemberRows | None = None

    def open(self) -> None:
        self.close()
        npz, entry, shape = self.npz, self.entry, self.shape
        self.zf = zipfile.ZipFile(npz)
        self.q = q = MemberRows(self.zf, self.members["q"], npz)
        if entry["bit_width"] == 32:   # stored float32, as the tensor's dtype says
            self.spec, self.data, self.row_items = None, {}, shape[-1] if shape else 1
            if q.dtype != np.float32 or q.size != math.prod(shape):
                raise ConvcoreError(f"{npz}: tensor {entry['name']!r} read as {q.dtype}{list(q.shape)}, "
                                    f"expected f32{list(shape)}")
            return
        small = {k: read_member(self.zf, m, npz) for k, m in self.members.items() if k != "q" and m is not None}
        self.spec = spec = convcore.get_registry().scheme(entry.get("scheme") or f"int{entry['bit_width']}-row")
        found = {"q": (q.dtype, q.shape, q.size), "scales": small["scales"]}
        if "zero_points" in small:
            found["zero_points"] = small["zero_points"]
        layout = spec.layout(shape, "f32")
        self.data = {}
        for key, array in found.items():  # dtypes and sizes the scheme's kernels expect
            dtype, have, size = array if key == "q" else (array.dtype, array.shape, array.size)
            want = layout.get(key)
            if (want is None or dtype != convcore.numpy_dtype(want[0]) or size != math.prod(want[1])
                    or (key == "q" and tuple(want[1][:1]) != (self.n_rows,))):
                raise ConvcoreError(f"{npz}: weight {entry['name']!r}: its {key} member is "
                                    f"{dtype}{list(have)}, {spec.name} on shape "
                                    f"{list(shape)} needs {want}")
            if key == "q":   # read a block of rows at a time: (rows, ...) of the layout
                self.row_shape = tuple(want[1][1:])
                self.row_items = math.prod(self.row_shape)
            else:
                self.data[key] = array.reshape(want[1])

    def rows(self, a: int, b: int) -> np.ndarray:
        q = self.q.rows(a, b, self.row_items)
        if b >= self.n_rows:
            self.close()
        if self.spec is None:
            return q
        part = {k: (v[a:b] if v.ndim and v.shape[0] == self.n_rows else v) for k, v in self.data.items()}
        q = q.reshape(b - a, *self.row_shape)
        return np.asarray(self.spec.dequantize({"q": q, **part}, (b - a, self.shape[-1])), dtype=np.float32)

    def close(self) -> None:
        q, zf, self.q, self.zf = self.q, self.zf, None, None
        if q is not None:
            q.close()
        if zf is not None:
            zf.close()


def _member_loader(npz: Path, members: dict[str, str | None], entry: dict[str, Any], floats: bool
                   ) -> tuple[Callable[[], np.ndarray], Callable[[str], Iterator[np.ndarray]] | None]:
    """(load, chunk_loader) of a weight: a quantized one dequantized a block of rows at a
    time (never a whole float32 copy: 262 MB for the 1.1B model's embedding; nor its whole
    codes: 537 MB for a 262144 x 2048 embedding at 8 bits), stored floats (``floats``)
    also handed out a block of rows at a time; None for other stored types."""
    shape = tuple(entry["shape"])
    quantized = entry["bit_width"] != 32 and len(shape) == 2

    def load() -> np.ndarray:
        if not quantized:   # as stored, whole
            with zipfile.ZipFile(npz) as zf:
                return read_member(zf, members["q"], npz).reshape(shape)
        state = _Pass(npz, members, entry)
        try:
            return convcore.row_block_loaders(shape, state.rows, "f32", state.open)[0]()
        finally:
            state.close()

    def pieces(out: str) -> Iterator[np.ndarray]:
        state = _Pass(npz, members, entry)
        try:
            yield from convcore.row_block_loaders(shape, state.rows, "f32", state.open)[1](out)
        finally:
            state.close()

    return load, pieces if quantized or floats else None


@convcore.hookimpl
def convcore_load(path: Path, fmt: str, options: dict[str, Any]) -> Model | None:
    if fmt != "npz":
        return None
    npz, manifest = _read_manifest(Path(path))
    try:
        with zipfile.ZipFile(npz) as zf:
            present = {i.filename.removesuffix(".npy"): i.compress_size for i in zf.infolist()}
    except zipfile.BadZipFile as exc:
        raise ConvcoreError(f"{npz}: not a valid npz ({exc})") from None
    tensors: dict[str, TensorRef] = {}
    for entry in manifest["weights"]:
        members = {"q": entry["q"], "scales": entry.get("q_scales"), "zero_points": entry.get("q_zero_point")}
        for m in members.values():
            if m is not None and m not in present:
                raise ConvcoreError(f"{npz}: member {m!r} of weight {entry['name']!r} is missing")
        quantized = entry["bit_width"] != 32
        dtype = "f32" if quantized else entry.get("dtype", "f32")
        if dtype not in ("f32",) and dtype in convcore.FLOAT_DTYPES:
            dtype = "f32"
        load, pieces = _member_loader(npz, members, entry, dtype == "f32")
        tensors[entry["name"]] = TensorRef(entry["name"], tuple(entry["shape"]), dtype, load,
                                           source=str(npz),
                                           stored=entry.get("scheme", "") if quantized else "",
                                           stored_nbytes=sum(present[m] for m in members.values()
                                                             if m is not None),
                                           chunk_loader=pieces)
    config_path = Path(path) / "config.json"
    block = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    arch = block.get("arch") or block.get("family") or "unknown"   # APL names it family
    config = convcore.read_json(config_path) if config_path.is_file() else {"model_type": arch}
    metadata = {str(k): str(v) for k, v in (manifest.get("metadata") or {}).items()} \
        if isinstance(manifest.get("metadata"), dict) else {}
    metadata["name"] = block.get("name", "")
    return Model(arch=convcore.arch_of(config), config=config, tensors=tensors,
                 tokenizer=convcore.read_tokenizer_files(Path(path)),
                 metadata=metadata, source=str(path), format="npz")


@convcore.hookimpl
def convcore_validate(path: Path, fmt: str) -> list[str] | None:
    if fmt != "npz":
        return None
    problems: list[str] = []
    try:
        npz, manifest = _read_manifest(Path(path))
        with zipfile.ZipFile(npz) as zf:
            present = {n.removesuffix(".npy") for n in zf.namelist()}
        with zipfile.ZipFile(npz) as z:
            for entry in manifest["weights"]:
                name, bits = entry["name"], entry["bit_width"]
                missing = [m for m in (entry["q"], entry.get("q_scales"), entry.get("q_zero_point"))
                           if m is not None and m not in present]
                if missing:
                    problems.append(f"{npz}: weight {name!r}: member {missing[0]!r} missing")
                    continue
                shape = tuple(entry["shape"])
                rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
                q_shape, _ = check_member(z, entry["q"], npz)   # read through, not kept
                if bits == 32:
                    if math.prod(q_shape) != int(np.prod(shape)):
                        problems.append(f"{npz}: weight {name!r}: {math.prod(q_shape)} values for shape {list(shape)}")
                    continue
                want = (rows, -(-shape[-1] * bits // 8)) if bits < 8 else (rows, shape[-1])
                if tuple(q_shape) != want:
                    problems.append(f"{npz}: weight {name!r}: codes {list(q_shape)}, expected {list(want)} at {bits} bits")
                err = entry.get("rel_error")
                tol = TOLERANCE.get(bits)
                if err is None and str(manifest.get("format_version")) == "2":
                    continue   # APL's own manifests carry no measured error
                if tol is None or type(err) not in (int, float) or not err <= tol:
                    problems.append(f"{npz}: weight {name!r}: relative error {err} over the {tol} "
                                    f"tolerance for {bits} bits")
    except (ConvcoreError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        problems.append(str(exc) if isinstance(exc, ConvcoreError) else f"{path}: {type(exc).__name__}: {exc}")
    config_path = Path(path) / "config.json"
    if config_path.is_file():  # read by loading too
        try:
            if not isinstance(convcore.read_json(config_path), dict):
                problems.append(f"{config_path}: not a JSON object")
        except ConvcoreError as exc:
            problems.append(str(exc))
    return problems
