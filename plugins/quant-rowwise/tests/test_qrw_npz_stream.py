"""Format npz a block of rows at a time: the streamed writer writes the members the
whole-tensor path writes, byte for byte, with the same relative error; the streamed reader
gives what whole-tensor dequantization gives."""
from __future__ import annotations

import io
import json
import struct
import zipfile

import numpy as np
import pytest

import convcore
from convcore import TensorRef
from quant_rowwise import npz_quant
from quant_rowwise.npz import SCHEMES
from quant_rowwise.npz_members import MemberRows, read_member, write_member


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _whole_error(x: np.ndarray, scheme: str, data: dict, step_elements: int) -> float:
    """The writer's relative error as it was computed over the whole tensor's codes."""
    spec = convcore.get_registry().scheme(scheme)
    rows, width = x.shape
    step = max(1, step_elements // width)
    diff2 = norm2 = 0.0
    for a in range(0, rows, step):
        b = min(a + step, rows)
        part = {k: (v[a:b] if v.ndim and v.shape[0] == rows else v) for k, v in data.items()}
        xs = np.asarray(convcore.cast(x[a:b], "f32"), np.float32).reshape(-1)
        d = xs - np.asarray(spec.dequantize(part, (b - a, width)), np.float32).reshape(-1)
        diff2 += float(np.dot(d, d))
        norm2 += float(np.dot(xs, xs))
    return diff2 ** 0.5 / norm2 ** 0.5


def _streamed(ref: TensorRef, scheme: str, search: str = "mse") -> tuple[dict[str, bytes], float]:
    entry = {"q": "q", "q_scales": "s", "q_zero_point": "z" if scheme.startswith("int") and
             scheme.endswith("-row") else None}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        err = npz_quant.write_quantized(zf, ref, scheme, search, entry, "test.npz")
    with zipfile.ZipFile(buf) as zf:
        return {n.removesuffix(".npy"): zf.read(n) for n in zf.namelist()}, err


def _source(rows: int, width: int, dtype: str = "f32", seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, width), dtype=np.float32)
    x[3] = 0.0                    # a constant row
    x[5, :4] = [7.0, -9.0, 0, 0]   # outliers: the per-tensor scale comes from row 5
    return convcore.cast(x, dtype)


def _chunked(array: np.ndarray, piece: int) -> TensorRef:
    """A reader that makes its tensor (no file map): flat float32 pieces of odd sizes."""
    flat = convcore.cast(array, "f32").reshape(-1)
    return TensorRef("w", array.shape, convcore.dtype_name(array.dtype), lambda: array,
                     chunk_loader=lambda out: (convcore.cast(flat[i:i + piece], out)
                                               for i in range(0, flat.size, piece)))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_streamed_members_are_the_whole_tensor_members(scheme, monkeypatch, tmp_path):
    x = _source(37, 45)
    mapped = tmp_path / "x.bin"
    x.tofile(mapped)
    whole = convcore.quantize(x, scheme, {"name": "w", "search": "mse"}).data
    want = {"q": _npy(whole["q"]), "s": _npy(whole["scales"])}
    if "zero_points" in whole:
        want["z"] = _npy(whole["zero_points"])
    # the default blocks (the whole tensor at once), then 4 rows a block (2 per error block;
    # the last block one row) from a file map and from a reader's pieces of 7 values
    got, err = _streamed(TensorRef("w", x.shape, "f32", lambda: x), scheme)
    assert got == want and err == _whole_error(x, scheme, whole, npz_quant.ERROR_ROWS_ELEMENTS)
    monkeypatch.setattr(npz_quant, "WRITE_BLOCK_ELEMENTS", 5 * 45)
    monkeypatch.setattr(npz_quant, "ERROR_ROWS_ELEMENTS", 2 * 45)
    assert npz_quant.block_rows(45) == 4
    mapped_x = np.memmap(mapped, np.float32, "r", shape=x.shape)
    for how, ref in (("file map", TensorRef("w", x.shape, "f32", lambda: mapped_x)),
                     ("reader pieces", _chunked(x, 7))):
        got, err = _streamed(ref, scheme)
        assert got == want, how
        assert err == _whole_error(x, scheme, whole, 2 * 45), how


@pytest.mark.parametrize("scheme", ["int4-row", "int8-tensor"])
def test_streamed_members_from_bf16_and_minmax(scheme, monkeypatch):
    x = _source(29, 40, "bf16", seed=1)
    monkeypatch.setattr(npz_quant, "WRITE_BLOCK_ELEMENTS", 3 * 40)
    monkeypatch.setattr(npz_quant, "ERROR_ROWS_ELEMENTS", 40)
    whole = convcore.quantize(x, scheme, {"name": "w", "search": "minmax"}).data
    for ref in (TensorRef("w", x.shape, "bf16", lambda: x), _chunked(x, 11)):
        got, err = _streamed(ref, scheme, "minmax")
        assert got["q"] == _npy(whole["q"]) and got["s"] == _npy(whole["scales"])
        assert err == _whole_error(x, scheme, whole, 40)


def test_streamed_writer_keeps_the_one_line_errors(monkeypatch):
    monkeypatch.setattr(npz_quant, "WRITE_BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(npz_quant, "ERROR_ROWS_ELEMENTS", 1)
    x = _source(8, 16)
    x[6, 2] = np.inf   # in the last blocks: the first were written already
    for scheme in ("int8-row", "int8-tensor"):
        with pytest.raises(convcore.ConvcoreError, match=f"^tensor 'w': {scheme}: NaN or Inf in input$"):
            _streamed(TensorRef("w", x.shape, "f32", lambda: x), scheme)
    f64 = np.zeros((4, 8))
    for scheme in ("int8-row", "int8-tensor"):
        with pytest.raises(convcore.ConvcoreError, match=f"cannot quantize f64 with {scheme}"):
            _streamed(TensorRef("w", f64.shape, "f64", lambda: f64), scheme)


@pytest.fixture(scope="module")
def written(tiny_llama, tmp_path_factory):
    """tiny_llama as npz int4-row, written with the default blocks and with blocks of a few
    rows (and reader pieces: npz -> npz)."""
    root = tmp_path_factory.mktemp("npz-stream")
    default = convcore.convert(tiny_llama, root / "default", to="npz", quant="int4-row")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(npz_quant, "WRITE_BLOCK_ELEMENTS", 256 * 256)   # 256 rows of 256 a block
        mp.setattr(npz_quant, "ERROR_ROWS_ELEMENTS", 128 * 256)
        small = convcore.convert(tiny_llama, root / "small", to="npz", quant="int4-row")
        from convcore import rowblocks
        mp.setattr(rowblocks, "BLOCK_ELEMENTS", 40000)   # pieces of 156 rows of 256 across the blocks
        again = convcore.convert(default, root / "again", to="npz", quant="int8-row")
    return default, small, again


def _members(folder) -> dict[str, bytes]:
    with zipfile.ZipFile(next(folder.glob("*.npz"))) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def test_converted_npz_is_the_same_with_any_block(written):
    default, small, again = written
    assert _members(default) == _members(small)
    errors = [{w["name"]: w["rel_error"] for w in json.loads(next(f.glob("*_manifest_*.json")).read_text())["weights"]
               if "rel_error" in w} for f in (default, small)]
    # the error sums' blocks differ (128 rows, 2**21 values): the same to float rounding
    assert errors[0].keys() == errors[1].keys()
    for name, err in errors[0].items():
        assert err == pytest.approx(errors[1][name], rel=1e-6, abs=0), name
    # npz -> npz: the reader's pieces gathered into row blocks give what its whole tensors give
    src = convcore.load(default)
    with zipfile.ZipFile(next(again.glob("*.npz"))) as zf:
        for i, (name, ref) in enumerate(src.tensors.items()):
            if not ref.stored:
                continue
            qt = convcore.quantize(ref.load(), "int8-row", {"name": name})
            assert zf.read(f"w{i}_q.npy") == _npy(qt.data["q"]), name
            assert zf.read(f"w{i}_scales.npy") == _npy(qt.data["scales"]), name
    assert convcore.get_registry().validate(again) == []


def _whole_dequantized(folder, entry: dict) -> np.ndarray:
    with zipfile.ZipFile(next(folder.glob("*.npz"))) as zf:
        data = {"q": read_member(zf, entry["q"], folder), "scales": read_member(zf, entry["q_scales"], folder)}
        if entry.get("q_zero_point"):
            data["zero_points"] = read_member(zf, entry["q_zero_point"], folder)
    return convcore.get_registry().scheme(entry["scheme"]).dequantize(data, tuple(entry["shape"]))


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_streamed_reader_gives_the_whole_dequantization(written, tmp_path, compression, monkeypatch):
    default = written[0]
    folder = tmp_path / "m"
    folder.mkdir()
    for f in default.iterdir():
        if f.suffix != ".npz":
            (folder / f.name).write_bytes(f.read_bytes())
    with zipfile.ZipFile(folder / next(default.glob("*.npz")).name, "w", compression) as zf:
        for name, raw in _members(default).items():
            zf.writestr(name, raw)
    manifest = json.loads(next(folder.glob("*_manifest_*.json")).read_text())
    from convcore import rowblocks
    monkeypatch.setattr(rowblocks, "BLOCK_ELEMENTS", 1 << 16)   # 256 rows of 256 a block
    model = convcore.load(folder)
    for entry in manifest["weights"]:
        ref = model.tensors[entry["name"]]
        pieces = list(ref.load_chunks("f32"))
        got = np.concatenate(pieces).reshape(ref.shape)
        if entry["bit_width"] == 32:
            with zipfile.ZipFile(next(folder.glob("*.npz"))) as zf:
                want = read_member(zf, entry["q"], folder).reshape(ref.shape)
        else:
            want = _whole_dequantized(folder, entry)
            assert len(pieces) == -(-ref.shape[0] // max(1, (1 << 16) // ref.shape[1]))
        assert got.tobytes() == want.tobytes(), entry["name"]
        assert ref.load().tobytes() == want.tobytes(), entry["name"]
    assert convcore.get_registry().validate(folder) == []


def test_streamed_reader_checks_the_crc_and_reads_fortran_members(written, tmp_path):
    default = written[0]
    folder = tmp_path / "m"
    folder.mkdir()
    for f in default.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    npz = next(folder.glob("*.npz"))
    with zipfile.ZipFile(npz) as zf:
        info = zf.getinfo("w0_q.npy")
    raw = bytearray(npz.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len + 1000] ^= 0xFF   # a code byte
    npz.write_bytes(bytes(raw))
    ref = next(iter(convcore.load(folder).tensors.values()))
    with pytest.raises(convcore.ConvcoreError, match="Bad CRC-32"):
        list(ref.load_chunks("f32"))
    assert any("Bad CRC-32" in p for p in convcore.get_registry().validate(folder))
    # a member another tool wrote in Fortran order reads in C order all the same
    a = np.arange(6 * 5, dtype=np.uint8).reshape(6, 5)
    with zipfile.ZipFile(tmp_path / "f.npz", "w") as zf:
        with zf.open("f.npy", "w") as f:
            np.lib.format.write_array(f, np.asfortranarray(a))
        write_member(zf, "c", a)
    with zipfile.ZipFile(tmp_path / "f.npz") as zf:
        for member in ("f", "c"):
            rows = MemberRows(zf, member, tmp_path / "f.npz")
            assert np.array_equal(np.concatenate([rows.rows(0, 4, 5), rows.rows(4, 6, 5)]), a)
            rows.close()
