"""``convcore validate`` for Parquet weight files: every problem, one line each.

Checks the schema version (V1 or V2 from the columns, and what ``convcore.schema`` says),
that names are unique, shapes and dtypes make sense and ``num_params`` agrees, that the
parts of a split output are all there, and row by row (reading one row group at a
time) that ``data`` holds exactly shape x dtype size (or the scheme's packed codes), that a
V2 row's scales and zero points fit its ``quant_axis`` and ``group_size``, and that the
chunks of a tensor stored as several rows are all there, once each, in order and alike
(:mod:`conv_parquet.chunks`).
"""
from __future__ import annotations

from pathlib import Path

from convcore import ConvcoreError, get_registry

from . import kv as kvmeta
from .reader import WeightTable


def validate_parquet(path: Path) -> list[str]:
    """One-line problems of the weight file or part directory ``path`` (empty: valid)."""
    problems: list[str] = []
    try:
        table = WeightTable(Path(path), problems=problems)
    except ConvcoreError as exc:
        return problems + [str(exc)]
    declared = table.kv.get("convcore.schema")
    if declared is not None and declared != f"V{table.version}":
        problems.append(f"{path}: metadata says schema {declared}, but its columns are V{table.version}")
    try:
        kvmeta.decode(table.kv, str(path))
    except ConvcoreError as exc:
        problems.append(str(exc))
    registry = get_registry()
    for row in table.rows.values():
        try:
            table.check(row, registry)
        except ConvcoreError as exc:
            problems.append(str(exc))
    return problems
