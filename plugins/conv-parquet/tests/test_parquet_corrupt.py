"""Damaged files give one-line errors naming the file, from loading, converting and
validating: truncated, not a weight table, wrong column types, data that does not fit
the shape, duplicate names, V2 scales that do not fit the group size, missing parts,
hostile sizes."""
from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import convcore
from parquet_helpers import plain_v1, rewrite


@pytest.fixture(scope="module")
def files(tiny_model_factory, tmp_path_factory):
    src = tiny_model_factory("llama")
    root = tmp_path_factory.mktemp("good")
    return {"v1": convcore.convert(src, root / "v1.parquet", to="parquet"),
            "v2": convcore.convert(src, root / "v2.parquet", to="parquet", quant="int4-g64"),
            "sym": convcore.convert(src, root / "sym.parquet", to="parquet", quant="int8-row-sym"),
            "split": convcore.convert(src, root / "split.parquet", to="parquet",
                                      options={"split_max_size": "600K"})}


def _truncated(files, dst):
    data = files["v1"].read_bytes()
    dst.write_bytes(data[: len(data) * 3 // 5])


def _set(column, row, value):
    def change(columns):
        columns[column][row] = value
    return change


def _short_data(columns):
    columns["data"][2] = columns["data"][2][:-4]


def _short_scales(columns):
    i = next(i for i, q in enumerate(columns["quant_type"]) if q == "int4-g64")
    columns["scales"][i] = columns["scales"][i][:-4]


def _duplicate(columns):
    columns["layer_name"][3] = columns["layer_name"][1]


def _missing_part(files, dst):
    shutil.copytree(files["split"], dst)
    (dst / "part-00001.parquet").unlink()


CASES = {
    "truncated": (_truncated, "truncated: no Parquet footer at its end"),
    "not a weight table": (lambda f, d: pq.write_table(pa.table({"name": ["a"], "values": [1.0]}), d),
                           "not a Parquet weight table: no column layer_name, shape, dtype, data, num_params"),
    "wrong column type": (lambda f, d: pq.write_table(pa.table(
        {"layer_name": ["a"], "shape": [[1]], "dtype": ["float32"], "data": [7], "num_params": [1]}), d),
        "column data is int64, expected binary (schema V1)"),
    "data length": (lambda f, d: rewrite(f["v1"], d, _short_data),
                    "'model.layers.0.input_layernorm.weight': data holds 1020 bytes; shape [256] of f32 needs 1024"),
    "duplicate names": (lambda f, d: rewrite(f["v1"], d, _duplicate), "appears twice"),
    "num_params": (lambda f, d: rewrite(f["v1"], d, _set("num_params", 0, 5)), "num_params 5 but shape"),
    "dtype": (lambda f, d: rewrite(f["v1"], d, _set("dtype", 0, "float7")), "unknown dtype 'float7'"),
    "scales vs group": (lambda f, d: rewrite(f["v2"], d, _short_scales),
                        "scales holds 16380 bytes; quant_axis 0, group_size 64 on shape [1024, 256] needs 16384"),
    "group size": (lambda f, d: rewrite(f["v2"], d, _set("group_size", 1, 32)),
                   "quant_axis 0 / group_size 32, but int4-g64 on shape"),
    "symmetric zero points": (lambda f, d: rewrite(f["sym"], d, _set("zero_points", 0, b"\0" * 4096)),
                              "zero_points given, but int8-row-sym is symmetric"),
    "missing part": (_missing_part, "part files, but they say there are 12 (part 1 missing)"),
    "hostile shape": (lambda f, d: plain_v1(d, {"w": np.ones(4, np.float32)}, shape=[[2**31 - 1] * 2],
                                            num_params=[(2**31 - 1) ** 2]),
                      "data holds 16 bytes; shape [2147483647, 2147483647] of f32 needs 18446744056529682436"),
}


# a third of the damage in the default tier, all of it in make test-full
@pytest.mark.parametrize("case", [pytest.param(c, marks=() if i % 3 == 0 else pytest.mark.full)
                                  for i, c in enumerate(CASES)])
def test_damage_is_one_line_naming_the_file(files, tmp_path, run_cli, registry, case):
    make, message = CASES[case]
    bad = tmp_path / "bad.parquet"
    make(files, bad)
    # validate: exit 1, every problem one line naming the file
    r = run_cli("validate", bad, "--format", "parquet")
    assert r.returncode == 1, r.stdout
    lines = r.stderr.splitlines()
    assert lines and all(line.startswith(f"invalid: {bad}") for line in lines), r.stderr
    assert any(message in line for line in lines), r.stderr
    # converting: one error line, nothing written
    r = run_cli("run", bad, "-o", tmp_path / "out", "--to", "hf", "--from", "parquet")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: {bad}"), r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_python_api_raises_convcore_errors(files, tmp_path, registry):
    bad = rewrite(files["v2"], tmp_path / "bad.parquet", _short_scales)
    model = convcore.load(bad)  # the footer and small columns are fine
    with pytest.raises(convcore.ConvcoreError, match="scales holds 16380 bytes"):
        for ref in model.tensors.values():
            ref.load()
    problems = registry.validate(bad)
    assert len(problems) == 1 and str(bad) in problems[0]


def test_a_value_over_two_gib_is_refused_before_writing(tiny_llama, tmp_path, registry, monkeypatch):
    from conv_parquet import writer
    monkeypatch.setattr(writer, "MAX_VALUE_BYTES", 100_000)
    with pytest.raises(convcore.ConvcoreError, match="is 1048576 bytes; a Parquet value holds at most 2 GiB"):
        convcore.convert(tiny_llama, tmp_path / "m.parquet", to="parquet")
    assert list(tmp_path.iterdir()) == []
