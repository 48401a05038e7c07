"""Tensors over ``chunk_size`` are stored as several rows of the same name, in order, one
row group each (chunk 0, 1, ..., row_start on the first axis): they read back bit for bit
as the one-row file does, duckdb and polars put one together with one query, and a
chunk missing, repeated, out of order or overlapping is one line naming file and tensor."""
from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest

import convcore
from conv_parquet import WeightLoader
from parquet_helpers import rewrite, tensors

CHUNK = 4096
EMBED = "model.embed_tokens.weight"
CASES = [(None, None), pytest.param(None, "bf16", marks=pytest.mark.full), ("int8-row", None),
         pytest.param("int4-g64", "bf16", marks=pytest.mark.full),
         pytest.param("int8-tensor", None, marks=pytest.mark.full)]


class _Files(dict):
    """{(quant, dtype): (chunked file, one-row-per-tensor file)} of the tiny llama, each
    pair converted on first use."""

    def __init__(self, src, root):
        super().__init__()
        self.src, self.root = src, root

    def __missing__(self, key):
        quant, dtype = key
        name = f"{quant}-{dtype}"
        self[key] = tuple(
            convcore.convert(self.src, self.root / f"{name}-{kind}.parquet", to="parquet", quant=quant,
                             dtype=dtype, options=options)
            # quantized: chunks by the float size, quantized one at a time (fewer of them)
            for kind, options in (("chunked", {"chunk_size": CHUNK * (4 if quant else 1)}), ("rows", {})))
        return self[key]


@pytest.fixture(scope="module")
def files(tiny_llama, tmp_path_factory):
    return _Files(tiny_llama, tmp_path_factory.mktemp("chunks"))


def _rows(path, name):
    table = pq.read_table(path, columns=["layer_name", "shape", "num_params", "chunk", "row_start", "data"])
    return [{c: table.column(c)[i].as_py() for c in table.column_names}
            for i in range(table.num_rows) if table.column("layer_name")[i].as_py() == name]


@pytest.mark.parametrize("quant, dtype", CASES)
def test_chunked_file_reads_as_the_one_row_file(files, tmp_path, registry, quant, dtype):
    chunked, rows = files[quant, dtype]
    meta = pq.read_metadata(chunked)
    assert all(meta.row_group(i).num_rows == 1 for i in range(meta.num_row_groups))  # a row group each
    model = convcore.load(rows)
    embed = _rows(chunked, EMBED)
    assert len(embed) > 4 and [r["chunk"] for r in embed] == list(range(len(embed)))
    width = model.tensors[EMBED].shape[1]
    assert [r["row_start"] for r in embed] == [sum(r["num_params"] for r in embed[:k]) // width
                                               for k in range(len(embed))]
    assert all(r["shape"] == list(model.tensors[EMBED].shape) for r in embed)
    assert sum(r["num_params"] for r in embed) == model.tensors[EMBED].numel
    norm = _rows(chunked, "model.norm.weight")  # small: one row, no chunk
    assert len(norm) == 1 and norm[0]["chunk"] is None and norm[0]["row_start"] is None
    assert tensors(chunked) == tensors(rows)
    a, b = WeightLoader(chunked), WeightLoader(rows)
    assert list(a) == list(b) and a.info(EMBED)["chunks"] == len(embed)
    for name in b:
        assert a.get_layer(name).tobytes() == b.get_layer(name).tobytes(), name
    assert registry.validate(chunked) == []
    back = convcore.convert(chunked, tmp_path / "hf", to="hf")
    assert tensors(back) == tensors(rows)  # streamed a chunk at a time, bit for bit


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_v1_chunks_hold_slices_and_go_back_to_hf_bit_exact(files, tiny_llama, tmp_path, dtype):
    chunked, _ = files[None, dtype]
    source = convcore.load(tiny_llama)
    want = convcore.cast(source.tensors[EMBED].load(), dtype) if dtype else source.tensors[EMBED].load()
    for r in _rows(chunked, EMBED):
        rows = r["num_params"] // want.shape[1]
        assert r["data"] == want[r["row_start"]:r["row_start"] + rows].tobytes()
        assert len(r["data"]) <= CHUNK
    back = convcore.convert(chunked, tmp_path / "hf", to="hf")
    expect = convcore.convert(tiny_llama, tmp_path / "direct", to="hf", dtype=dtype)
    assert tensors(back) == tensors(expect)


def test_files_without_large_tensors_keep_the_old_schema(files, registry):
    _, rows = files[None, None]
    assert "chunk" not in pq.read_schema(rows).names  # old readers read them as before


def test_chunks_in_a_part_directory(tiny_llama, tmp_path, registry):
    out = convcore.convert(tiny_llama, tmp_path / "split", to="parquet",
                           options={"split_max_size": "600K", "chunk_size": "16K"})
    assert len(list(out.iterdir())) >= 3
    assert tensors(out) == tensors(tiny_llama) and registry.validate(out) == []


def test_chunk_size_out_of_range_is_refused(tiny_llama, tmp_path, registry):
    with pytest.raises(convcore.ConvcoreError, match="chunk_size=3000000000 is not between 1 byte and 2 GiB"):
        convcore.convert(tiny_llama, tmp_path / "m.parquet", to="parquet", options={"chunk_size": "3G"})


def test_duckdb_and_polars_put_a_tensor_together(files, tiny_llama):
    duckdb = pytest.importorskip("duckdb")
    pl = pytest.importorskip("polars")
    chunked, _ = files[None, None]
    want = convcore.load(tiny_llama).tensors[EMBED].load().tobytes()
    # string_agg would turn the bytes into escaped text: concatenate the blobs instead
    got = duckdb.sql(f"SELECT list_reduce(list(data ORDER BY chunk), lambda a, b: a || b) "
                     f"FROM '{chunked}' WHERE layer_name = '{EMBED}'").fetchall()[0][0]
    assert got == want
    frame = (pl.scan_parquet(chunked).filter(pl.col("layer_name") == EMBED)
             .sort("chunk", nulls_last=False).select("data").collect())
    assert b"".join(frame["data"].to_list()) == want


def _embed_rows(columns):
    return [i for i, n in enumerate(columns["layer_name"]) if n == EMBED]


def _drop(which):
    def change(columns):
        i = _embed_rows(columns)[which]
        for values in columns.values():
            del values[i]
    return change


def _duplicate(columns):
    i = _embed_rows(columns)[2]
    for values in columns.values():
        values.insert(i + 1, values[i])


def _swap(columns):
    i, j = _embed_rows(columns)[1:3]
    for values in columns.values():
        values[i], values[j] = values[j], values[i]


def _overlap(columns):
    i = _embed_rows(columns)[3]
    columns["row_start"][i] -= 1


def _other_dtype(columns):
    i = _embed_rows(columns)[1]
    columns["dtype"][i] = "float16"
    columns["data"][i] = columns["data"][i][: len(columns["data"][i]) // 2]


def _odd_rows(columns):
    i = _embed_rows(columns)[1]
    columns["num_params"][i] -= 1


BROKEN = {
    "middle chunk dropped": (_drop(3), "tensor 'model.embed_tokens.weight': chunk 3 missing (chunk 4 follows chunk 2)"),
    "last chunk dropped": (_drop(-1), "chunks cover indices [0, 1020) of the first axis of shape [1024, 256]: "
                                      "chunk 255 or later is missing"),
    "chunk repeated": (_duplicate, "tensor 'model.embed_tokens.weight': chunk 2 appears 2 times"),
    "chunks swapped": (_swap, "chunk 1 comes after chunk 2 (a tensor's chunks must be in order)"),
    "overlap": (_overlap, "chunk 3 starts at index 11 of the first axis, but chunk 2 ends at 12 (overlaps)"),
    "dtypes differ": (_other_dtype, "chunk 1 is f16[1024, 256], but chunk 0 is f32[1024, 256]"),
    "part of an index": (_odd_rows, "chunk 1: num_params 1023 is not a whole number of indices"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_chunks_are_one_line_naming_file_and_tensor(files, tmp_path, run_cli, registry, case):
    change, message = BROKEN[case]
    bad = rewrite(files[None, None][0], tmp_path / "bad.parquet", change)
    problems = registry.validate(bad)
    assert len(problems) == 1 and problems[0].startswith(f"{bad}") and message in problems[0], problems
    with pytest.raises(convcore.ConvcoreError, match=f"^{bad}.*") as caught:
        WeightLoader(bad)
    assert "\n" not in str(caught.value)
    if case != "middle chunk dropped":
        return  # the command line says it the same way (a child process: once is enough)
    r = run_cli("run", bad, "-o", tmp_path / "out", "--to", "hf", "--from", "parquet")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_a_short_chunk_names_its_chunk(files, tmp_path, registry):
    def short(columns):
        i = _embed_rows(columns)[5]
        columns["data"][i] = columns["data"][i][:-4]
    bad = rewrite(files[None, None][0], tmp_path / "bad.parquet", short)
    problems = registry.validate(bad)
    assert problems == [f"{bad}: tensor '{EMBED}', chunk 5: data holds 4092 bytes; shape [4, 256] of f32 "
                        "needs 4096"], problems
    with pytest.raises(convcore.ConvcoreError, match="chunk 5: data holds 4092 bytes"):
        WeightLoader(bad).get_layer(EMBED)
    assert math.prod((4, 256)) * 4 == CHUNK
