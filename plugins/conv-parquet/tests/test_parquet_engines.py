"""Query engines read the files as plain tables: duckdb on a file, polars and
pyarrow.dataset on a part-file directory; and files those engines write back load."""
from __future__ import annotations

import numpy as np
import pyarrow.dataset as ds
import pytest

import convcore
from parquet_helpers import tensors

duckdb = pytest.importorskip("duckdb")
pl = pytest.importorskip("polars")


@pytest.fixture(scope="module")
def model(tiny_model_factory):
    src = tiny_model_factory("llama")
    return src, convcore.load(src)


def test_duckdb_selects_names_and_params(model, tmp_path, registry):
    src, source = model
    out = convcore.convert(src, tmp_path / "m.parquet", to="parquet")
    rows = duckdb.sql(f"SELECT layer_name, num_params FROM '{out}'").fetchall()
    assert rows == [(n, r.numel) for n, r in source.tensors.items()]
    total = duckdb.sql(f"SELECT sum(num_params) FROM '{out}'").fetchall()[0][0]
    assert total == source.num_params
    name = "model.layers.0.self_attn.q_proj.weight"
    data, dtype = duckdb.sql(f"SELECT data, dtype FROM '{out}' WHERE layer_name = '{name}'").fetchall()[0]
    assert dtype == "float32" and bytes(data) == source.tensors[name].load().tobytes()
    kv = dict(duckdb.sql(f"SELECT decode(key), decode(value) FROM parquet_kv_metadata('{out}')").fetchall())
    assert kv["convcore.arch"] == "llama" and '"model_type": "llama"' in kv["config.json"]


def test_duckdb_reads_v2_columns(model, tmp_path, registry):
    src, source = model
    out = convcore.convert(src, tmp_path / "q.parquet", to="parquet", quant="int4-g64")
    rows = duckdb.sql(f"SELECT quant_type, count(*), min(group_size), max(group_size) FROM '{out}' "
                      "GROUP BY quant_type ORDER BY quant_type").fetchall()
    norms = sum(1 for r in source.tensors.values() if len(r.shape) == 1)
    assert rows == [("int4-g64", len(source.tensors) - norms, 64, 64), ("none", norms, None, None)]


def test_polars_and_pyarrow_dataset_scan_a_part_directory(model, tmp_path, registry):
    src, source = model
    out = convcore.convert(src, tmp_path / "m.parquet", to="parquet", options={"split_max_size": "600K"})
    assert len(list(out.iterdir())) >= 3
    want = [(n, r.numel) for n, r in source.tensors.items()]
    frame = pl.scan_parquet(str(out / "*.parquet")).select("layer_name", "num_params").collect()
    assert list(zip(frame["layer_name"].to_list(), frame["num_params"].to_list())) == want
    table = ds.dataset(out, format="parquet").to_table(columns=["layer_name", "num_params", "data"])
    assert list(zip(table.column(0).to_pylist(), table.column(1).to_pylist())) == want
    assert table.column(2)[3].as_py() == np.ascontiguousarray(list(source.tensors.values())[3].load()).tobytes()


def test_files_the_engines_write_back_load(model, tmp_path, registry):
    src, _ = model
    out = convcore.convert(src, tmp_path / "q.parquet", to="parquet", quant="int8-row")
    duck = tmp_path / "duck" / "w.parquet"
    duck.parent.mkdir()
    duckdb.sql(f"COPY (SELECT * FROM '{out}') TO '{duck}' (FORMAT parquet)")
    polars_file = tmp_path / "polars" / "w.parquet"
    polars_file.parent.mkdir()
    pl.read_parquet(out).write_parquet(polars_file)  # large_string / large_binary columns
    want = tensors(out)
    for file in (duck, polars_file):
        assert convcore.get_registry().validate(file) == [], file
        assert tensors(file) == want, file
