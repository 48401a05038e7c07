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


ERROR_ROWS_ELEMENTS = 1 << 21


def relative_error_rows(x: np.ndarray, scheme: str, data: dict[str, np.ndarray]) -> float:
    """:func:`relative_error` of ``x`` (2-D) and its per-row codes ``data`` dequantized by
    ``scheme``, a block of rows at a time (float64 sums of float32 blocks): no whole-tensor float32
    copies (three of them took 786 MB for the 1.1B model's embedding)."""
    spec = convcore.get_registry().scheme(scheme)
    rows, width = x.shape
    step = max(1, ERROR_ROWS_ELEMENTS // max(1, width))
    diff2 = norm2 = 0.0
    release = convcore.page_releaser(x)
    for a in range(0, rows, step):
        b = min(a + step, rows)
        part = {k: (v[a:b] if v.ndim and v.shape[0] == rows else v) for k, v in data.items()}
        xs = np.asarray(convcore.cast(x[a:b], "f32"), np.float32).reshape(-1)
        d = xs - np.asarray(spec.dequantize(part, (b - a, width)), np.float32).reshape(-1)
        diff2 += float(np.dot(d, d))
        norm2 += float(np.dot(xs, xs))
        release(x[a:b])
    diff, norm = diff2 ** 0.5, norm2 ** 0.5
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


def _write_member(zf: zipfile.ZipFile, member: str, array: np.ndarray) -> None:
    with zf.open(member + ".npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


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
    npz_name = f"{name}_quantized_q{bits}.npz"
    weights = []
    with zipfile.ZipFile(path / npz_name, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for i, ref in enumerate(model.tensors.values()):
            entry: dict[str, Any] = {"name": ref.name, "shape": list(ref.shape)}
            if len(ref.shape) == 2 and ref.dtype in convcore.FLOAT_DTYPES:
                array = ref.load()
                qt = convcore.quantize(array, scheme, {"name": ref.name, "search": search})
                entry.update(bit_width=bits, scheme=scheme, q=f"w{i}_q", q_scales=f"w{i}_scales",
                             q_zero_point=f"w{i}_zp" if "zero_points" in qt.data else None,
                             rel_error=relative_error_rows(array, scheme, qt.data))
                _write_member(zf, entry["q"], qt.data["q"])
                _write_member(zf, entry["q_scales"], qt.data["scales"])
                if entry["q_zero_point"]:
                    _write_member(zf, entry["q_zero_point"], qt.data["zero_points"])
                del array, qt
            else:
                entry.update(bit_width=32, scheme="f32", q=f"w{i}", q_scales=None, q_zero_point=None,
                             dtype=ref.dtype)
                data = ref.load()
                _write_member(zf, entry["q"], convcore.cast(data, "f32") if ref.dtype in convcore.FLOAT_DTYPES else data)
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


def read_member(zf: zipfile.ZipFile, member: str, npz: Path) -> np.ndarray:
    """The array in ``member``.npy, its header checked against the member's size first
    (numpy allocates the header's shape before reading): no object dtypes (pickle), no
    shape the bytes do not hold."""
    where = f"{npz}: member {member!r}"
    try:
        info = zf.getinfo(member + ".npy")
    except KeyError:
        raise ConvcoreError(f"{where} is missing") from None
    # deflate packs at most ~1032:1; a member claiming more is not what it says
    if info.file_size > max(1 << 20, 1100 * info.compress_size):
        raise ConvcoreError(f"{where}: claims {info.file_size} bytes from {info.compress_size} compressed")
    with zf.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f".npy version {version}")
            shape, fortran, dtype = read_header(f)
        except (ValueError, TypeError, SyntaxError, EOFError) as exc:
            raise ConvcoreError(f"{where}: not a readable .npy header ({exc})".replace("\n", " ")) from None
        if dtype.hasobject or dtype.itemsize == 0:
            raise ConvcoreError(f"{where}: dtype {dtype} (Python objects or empty items) is refused")
        want = math.prod(shape) * dtype.itemsize
        have = info.file_size - f.tell()
        if want != have:
            raise ConvcoreError(f"{where}: header says shape {list(shape)} of {dtype} ({want} bytes), "
                                f"the member holds {have}")
        raw = f.read(have)
    return np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def _member_loader(npz: Path, members: dict[str, str | None], entry: dict[str, Any]
                   ) -> tuple[Callable[[], np.ndarray], Callable[[str], Iterator[np.ndarray]] | None]:
    """(load, chunk_loader) of a weight: a quantized one is also handed out dequantized a
    block of rows at a time (never a whole float32 copy: 262 MB for the 1.1B model's
    embedding); None for stored floats."""
    shape = tuple(entry["shape"])

    def payload() -> tuple[Any, dict[str, np.ndarray]]:
        with zipfile.ZipFile(npz) as zf:
            data = {k: read_member(zf, m, npz) for k, m in members.items() if m is not None}
        if entry["bit_width"] == 32:
            return None, {"q": data["q"].reshape(shape)}
        spec = convcore.get_registry().scheme(entry.get("scheme") or f"int{entry['bit_width']}-row")
        out = {"q": data["q"], "scales": data["scales"]}
        if "zero_points" in data:
            out["zero_points"] = data["zero_points"]
        layout = spec.layout(shape, "f32")
        for key, array in out.items():  # dtypes and sizes the scheme's kernels expect
            want = layout.get(key)
            if (want is None or array.dtype != convcore.numpy_dtype(want[0])
                    or array.size != math.prod(want[1])):
                raise ConvcoreError(f"{npz}: weight {entry['name']!r}: its {key} member is "
                                    f"{array.dtype}{list(array.shape)}, {spec.name} on shape "
                                    f"{list(shape)} needs {want}")
            out[key] = array.reshape(want[1])
        return spec, out

    def load() -> np.ndarray:
        spec, data = payload()
        return data["q"] if spec is None else spec.dequantize(data, shape)

    held: dict[str, Any] = {}
    n_rows = math.prod(shape[:-1])

    def prepare() -> None:
        held["spec"], held["data"] = payload()

    def rows(a: int, b: int) -> np.ndarray:
        part = {k: (v[a:b] if v.ndim and v.shape[0] == n_rows else v) for k, v in held["data"].items()}
        return np.asarray(held["spec"].dequantize(part, (b - a, shape[-1])), dtype=np.float32)

    quantized = entry["bit_width"] != 32 and len(shape) == 2
    pieces = convcore.row_block_loaders(shape, rows, "f32", prepare)[1] if quantized else None
    return load, pieces


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
        load, pieces = _member_loader(npz, members, entry)
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
                if bits == 32:
                    if read_member(z, entry["q"], npz).size != int(np.prod(shape)):
                        problems.append(f"{npz}: weight {name!r}: {read_member(z, entry['q'], npz).size} values for shape {list(shape)}")
                    continue
                q = read_member(z, entry["q"], npz)
                want = (rows, -(-shape[-1] * bits // 8)) if bits < 8 else (rows, shape[-1])
                if tuple(q.shape) != want:
                    problems.append(f"{npz}: weight {name!r}: codes {list(q.shape)}, expected {list(want)} at {bits} bits")
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
