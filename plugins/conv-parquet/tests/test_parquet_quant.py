"""V2: quantized rows dequantize to exactly what the scheme's own dequantize gives, the
columns mean what conv_parquet.schema says for each family, and int8-row keeps gaussian
weights within 1 %."""
from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest

import convcore
from conv_parquet import SCHEMES, WeightLoader
from conv_parquet import schema as schema_module
from parquet_helpers import hf_dir

FAMILIES = {  # scheme -> (quant_axis, group_size for a row of 512, zero_points column)
    "int8-row": (0, 512, "zero_points"), "int4-row": (0, 512, "zero_points"),
    "int2-row": (0, 512, "zero_points"), "int1-row": (0, 512, "zero_points"),
    "int8-row-sym": (0, 512, None), "int8-tensor": (-1, 0, None),
    **{s: (0, int(s.split("-g")[1]), "biases") for s in SCHEMES if "-g" in s},
}


def source(tmp_path, dtype: str):
    """A small safetensors model: two 2-D weights, a 3-D one, a norm, an int buffer."""
    rng = np.random.default_rng(7)
    arrays = {
        "a.weight": rng.standard_normal((64, 512), dtype=np.float32) * 0.02,
        "b.weight": rng.standard_normal((3, 32, 512), dtype=np.float32),
        "c.weight": rng.standard_normal((48, 512), dtype=np.float32) + 3.0,
        "norm.weight": rng.standard_normal(512, dtype=np.float32),
        "ids": np.arange(10, dtype=np.int64),
    }
    arrays = {k: convcore.cast(v, dtype) if v.dtype == np.float32 else v for k, v in arrays.items()}
    return hf_dir(tmp_path / f"src-{dtype}", arrays), arrays


def scheme_dequantize(registry, scheme: str, array: np.ndarray) -> np.ndarray:
    qt = convcore.quantize(array, scheme)
    return registry.scheme(scheme).dequantize(qt.data, qt.shape)


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_v2_dequantizes_exactly_as_the_scheme(tmp_path, registry, scheme, dtype):
    src, arrays = source(tmp_path, dtype)
    out = convcore.convert(src, tmp_path / "q.parquet", to="parquet", quant=scheme)
    loader, model = WeightLoader(out), convcore.load(out)
    table = pq.read_table(out)
    rows = {name: i for i, name in enumerate(table.column("layer_name").to_pylist())}
    axis, group, offset = FAMILIES[scheme]
    for name, array in arrays.items():
        i = rows[name]
        col = {c: table.column(c)[i].as_py() for c in table.column_names}
        if array.ndim < 2:  # norms and integer buffers stay as they are
            assert col["quant_type"] == "none" and col["scales"] is None and col["quant_axis"] is None
            assert loader.get_layer(name).tobytes() == array.tobytes()
            continue
        qt = convcore.quantize(array, scheme)
        layout = registry.scheme(scheme).layout(array.shape, dtype)
        code = "weight" if "weight" in layout else "q"
        assert col["quant_type"] == scheme and col["dtype"] == {"f32": "float32", "f16": "float16",
                                                                 "bf16": "bfloat16"}[dtype]
        assert col["data"] == qt.data[code].tobytes()
        assert col["scales"] == qt.data["scales"].astype("<f4").tobytes()
        if offset:
            assert col["zero_points"] == qt.data[offset].astype("<f4").tobytes()
        else:
            assert col["zero_points"] is None
        n_scales = math.prod(layout["scales"][1])
        assert (col["quant_axis"], col["group_size"]) == (axis, group if axis == -1 else
                                                           math.prod(array.shape) // n_scales)
        if axis == 0:
            assert col["group_size"] == (group if offset == "biases" else array.shape[-1])
        want = scheme_dequantize(registry, scheme, array)
        got = loader.get_layer(name)
        assert got.dtype == convcore.numpy_dtype(layout["scales"][0])
        assert np.array_equal(got.astype(np.float32), want), name  # exact, not close
        assert np.array_equal(model.tensors[name].load().astype(np.float32), want)
        assert model.tensors[name].stored == scheme
        assert model.tensors[name].stored_nbytes == sum(len(col[c] or b"") for c in ("data", "scales", "zero_points"))
    assert registry.validate(out) == []


def test_int8_row_error_on_gaussian_weights_is_under_one_percent(tmp_path, registry):
    src, arrays = source(tmp_path, "f32")
    out = convcore.convert(src, tmp_path / "q.parquet", to="parquet", quant="int8-row")
    loader = WeightLoader(out)
    for name in ("a.weight", "b.weight", "c.weight"):
        x, y = arrays[name], loader.get_layer(name)
        relative = np.linalg.norm(x - y) / np.linalg.norm(x)
        worst = np.abs(x - y).max() / np.abs(x).max()
        assert relative <= 0.01 and worst <= 0.01, (name, relative, worst)
        assert relative > 0  # it was quantized


def test_v2_to_hf_keeps_the_affine_dtype(tmp_path, registry):
    src, arrays = source(tmp_path, "bf16")
    out = convcore.convert(src, tmp_path / "q.parquet", to="parquet", quant="int4-g64")
    back = convcore.convert(out, tmp_path / "hf", to="hf")
    model = convcore.load(back)
    assert model.tensors["a.weight"].dtype == "bf16"  # scales and biases are bf16: exact
    want = scheme_dequantize(registry, "int4-g64", arrays["a.weight"])
    assert np.array_equal(model.tensors["a.weight"].load().astype(np.float32), want)
    assert model.tensors["ids"].load().tolist() == list(range(10))


def test_widths_that_do_not_fit_the_group_stay_float(tmp_path, registry):
    arrays = {"odd.weight": np.ones((4, 96), np.float32), "ok.weight": np.ones((4, 128), np.float32)}
    src = hf_dir(tmp_path / "src", arrays)
    out = convcore.convert(src, tmp_path / "q.parquet", to="parquet", quant="int4-g64")
    table = pq.read_table(out, columns=["layer_name", "quant_type"])
    types = dict(zip(table.column(0).to_pylist(), table.column(1).to_pylist()))
    assert types == {"odd.weight": "none", "ok.weight": "int4-g64"}


def test_a_scheme_the_format_does_not_list_is_refused(tiny_llama, tmp_path, registry):
    with pytest.raises(convcore.ConvcoreError, match="format parquet cannot store 'q4_k_m'"):
        convcore.convert(tiny_llama, tmp_path / "q.parquet", to="parquet", quant="q4_k_m")


@pytest.mark.parametrize("scheme", ["int4-row", "int8-tensor", "int4-g32", "int3-g128"])
def test_dequantizing_a_slice_of_rows_at_a_time_is_exact(tmp_path, registry, scheme, monkeypatch):
    from conv_parquet import reader
    src, arrays = source(tmp_path, "bf16")
    out = convcore.convert(src, tmp_path / "q.parquet", to="parquet", quant=scheme)
    monkeypatch.setattr(reader, "DEQUANT_CHUNK", 1000)  # fewer than two rows of 512 a slice
    loader = WeightLoader(out)
    for name in ("a.weight", "b.weight"):
        want = scheme_dequantize(registry, scheme, arrays[name])
        assert np.array_equal(loader.get_layer(name).astype(np.float32), want), name


@pytest.mark.parametrize("scheme", ["int8-row", "int4-g64"])
def test_v2_streams_to_hf_a_slice_at_a_time_with_the_same_bytes(tmp_path, registry, scheme):
    """Quantized rows reach the hf writer as dequantized slices (load_chunks), never as a
    whole float tensor, and the file it writes holds what load() gives, bit for bit."""
    from conv_parquet import reader

    src, _ = source(tmp_path, "bf16")
    out = convcore.convert(src, tmp_path / "q.parquet", to="parquet", quant=scheme)
    model = convcore.load(out)
    ref = model.tensors["b.weight"]
    assert ref.chunk_loader is not None and model.tensors["norm.weight"].chunk_loader is None
    pieces = list(reader.dequantized_pieces(*reader.WeightTable(out).payload(
        reader.WeightTable(out).rows["b.weight"]), ref.shape, "f16", chunk=1000))
    assert len(pieces) > 1 and all(p.ndim == 1 and p.dtype == np.float16 for p in pieces)
    for dtype in (None, "f16"):
        back = convcore.convert(out, tmp_path / f"back-{dtype}", to="hf", dtype=dtype)
        loaded = convcore.load(back)
        for name, r in model.tensors.items():
            want = r.load_as(dtype if r.dtype in convcore.FLOAT_DTYPES else None)
            np.testing.assert_array_equal(loaded.tensors[name].load(), want)


def test_row_search_option_reaches_the_scheme(tmp_path, registry):
    src, arrays = source(tmp_path, "f32")
    out = convcore.convert(src, tmp_path / "q.parquet", to="parquet", quant="int4-row",
                           options={"row_search": "minmax"})
    minmax = convcore.quantize(arrays["a.weight"], "int4-row", {"search": "minmax"})
    mse = convcore.quantize(arrays["a.weight"], "int4-row")
    assert minmax.data["scales"].tobytes() != mse.data["scales"].tobytes()
    row = pq.read_table(out).filter(pq.read_table(out).column("layer_name").to_numpy() == "a.weight")
    assert row.column("scales")[0].as_py() == minmax.data["scales"].tobytes()
    assert row.column("data")[0].as_py() == minmax.data["q"].tobytes()


@pytest.mark.parametrize("quant", [None, "int8-row"])
def test_rows_made_on_threads_and_spliced_are_pyarrows_own_file(tmp_path, registry, quant, monkeypatch):
    """Rows are made, encoded and compressed on several threads, each as a one-row-group
    file, and spliced in order (conv_parquet.splice). The file is byte for byte what one
    pyarrow ParquetWriter writes from the same rows, whatever the thread count (chunked
    tensors included); a large row is made with nothing beside it; an error in a row
    made on a thread names that tensor and leaves no output."""
    import threading

    from conv_parquet import kv as kvmeta
    from conv_parquet import writer

    src, arrays = source(tmp_path, "bf16")
    options = {"chunk_size": "20K"}  # the weights in chunks
    files = {t: convcore.convert(src, tmp_path / f"t{t}.parquet", to="parquet", quant=quant,
                                 options=dict(options, threads=t)).read_bytes() for t in (1, 2, 3)}
    assert files[1] == files[2] == files[3]

    # the same rows through one pyarrow writer
    model = convcore.load(src)
    planned = writer.plan(model, quant, None, 20000)
    assert sum(len(p.chunks) > 1 for p in planned) == 3  # the three weights
    version, chunked = (2 if quant else 1), True
    schema = schema_module.arrow_schema(version, chunked)
    settings = dict(compression="zstd", compression_level=None, use_dictionary=False, store_schema=False,
                    write_statistics=[c for c in writer.STATS_COLUMNS if c in schema.names])
    make = writer._Maker(version, "mse", chunked)
    with pq.ParquetWriter(tmp_path / "one.parquet", schema, **settings) as one:
        for job in writer._jobs(planned):
            one.write_table(make(job)[0])
        one.add_key_value_metadata(kvmeta.encode(model, f"V{version}"))
    assert (tmp_path / "one.parquet").read_bytes() == files[1]

    # every row taken as large: one at a time, the same bytes
    busy, most = [0], [0]
    lock = threading.Lock()
    real_make = writer._Maker.__call__

    def make_counted(self, job):
        with lock:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
        try:
            return real_make(self, job)
        finally:
            with lock:
                busy[0] -= 1
    monkeypatch.setattr(writer._Maker, "__call__", make_counted)
    monkeypatch.setattr(writer, "LARGE", 0)
    alone = convcore.convert(src, tmp_path / "alone.parquet", to="parquet", quant=quant,
                             options=dict(options, threads=2)).read_bytes()
    assert alone == files[1] and most[0] == 1
    monkeypatch.setattr(writer, "LARGE", 1 << 40)

    bad = dict(arrays, **{"c.weight": np.full((48, 512), np.nan, np.float32)})
    broken = hf_dir(tmp_path / "nan", bad)
    dst = tmp_path / "nan.parquet"
    with pytest.raises(convcore.ConvcoreError, match="c.weight holds NaN"):
        convcore.convert(broken, dst, to="parquet", quant=quant)
    assert not dst.exists() and not list(tmp_path.glob(".*nan*"))
