"""Helpers shared by the conv-parquet tests."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import convcore
from conv_parquet.schema import DTYPE_NAMES, arrow_schema


def tensors(path: Path, fmt: str | None = None) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """{name: (dtype, shape, bytes)} of the model at ``path``."""
    model = convcore.load(path, fmt)
    return {n: (r.dtype, tuple(r.shape), np.ascontiguousarray(r.load()).tobytes())
            for n, r in model.tensors.items()}


def plain_v1(path: Path, arrays: dict[str, np.ndarray], **overrides) -> Path:
    """A V1 file as another tool writes it: the plain schema, no key-value metadata, all
    rows in one row group. ``overrides``: {column: [values]} replacing computed ones."""
    names = list(arrays)
    columns = {
        "layer_name": names,
        "shape": [list(a.shape) for a in arrays.values()],
        "dtype": [DTYPE_NAMES[convcore.dtype_name(a.dtype)] for a in arrays.values()],
        "data": [np.ascontiguousarray(a).tobytes() for a in arrays.values()],
        "num_params": [math.prod(a.shape) for a in arrays.values()],
    }
    columns.update(overrides)
    pq.write_table(pa.table(columns, schema=arrow_schema(1)), path)
    return path


def rewrite(src: Path, dst: Path, change) -> Path:
    """``dst``: ``src`` with ``change(dict of column lists)`` applied, one row per row
    group and the key-value metadata kept (how a damaged file is made)."""
    table = pq.read_table(src)
    columns = {c: table.column(c).to_pylist() for c in table.column_names}
    change(columns)
    kv = pq.read_metadata(src).metadata
    pq.write_table(pa.table(columns, schema=table.schema.with_metadata(kv)), dst, row_group_size=1)
    return dst


def rchar() -> int:
    """Bytes this process has read through read()/pread() so far (Linux)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def hf_dir(path: Path, arrays: dict[str, np.ndarray], config: str = '{"model_type": "llama"}') -> Path:
    """A minimal HF directory holding ``arrays`` (one safetensors file) and a config."""
    path.mkdir(parents=True)
    convcore.write_sharded(path, [convcore.PlannedTensor(k, convcore.dtype_name(v.dtype), v.shape,
                                                         (lambda v=v: [v])) for k, v in arrays.items()],
                           max_shard_size=1 << 40)
    (path / "config.json").write_text(config)
    return path


# peak RSS of a convcore command in a child: the core's testing helper
from convcore.testing.memory import peak_rss_mb  # noqa: E402,F401
