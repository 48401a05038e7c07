"""``WeightLoader``: a Parquet weight file as a lazy, read-only mapping of tensors.

    from conv_parquet import WeightLoader
    weights = WeightLoader("model.parquet")          # footers + small columns only
    weights.keys()                                   # HF tensor names, in file order
    w = weights.get_layer("model.layers.0.mlp.up_proj.weight")   # reads that row group
    weights["lm_head.weight"]; len(weights); "x" in weights
    everything = weights.load_weights()              # {name: array}, read one at a time
    WeightLoader("model.parquet", device="cpu", dtype="float32")  # torch tensors

Quantized (V2) rows come back dequantized exactly as their scheme computes it: f32 for
the per-row schemes, the stored type for affine groups.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from convcore import ConvcoreError

from . import kv as kvmeta
from .reader import Row, WeightTable

SHORT_TORCH = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "f64": "float64"}


class WeightLoader(Mapping):
    """Tensors of the weight file (or part directory) ``path`` by name, read on access.

    :param path: a ``.parquet`` file or a directory of part files (schema V1 or V2).
    :param device: hand back torch tensors on this device (``"cpu"``, ``"cuda:0"``, ...).
    :param dtype: hand back torch tensors of this type (``torch.float16``, ``"bf16"``, ...).
    Without ``device`` and ``dtype`` the values are numpy arrays (bf16 as ml_dtypes).
    """

    def __init__(self, path: str | Path, *, device: Any = None, dtype: Any = None):
        self.path = Path(path)
        self._table = WeightTable(self.path)
        self._torch = None
        self.device, self.dtype = device, dtype
        if device is not None or dtype is not None:
            try:
                import torch
            except ImportError:
                raise ConvcoreError("WeightLoader(device=, dtype=) hands back torch tensors: "
                                    "pip install 'conv-parquet[infer]'") from None
            self._torch = torch
            if isinstance(dtype, str):
                name = SHORT_TORCH.get(dtype, dtype.removeprefix("torch."))
                if not isinstance(getattr(torch, name, None), torch.dtype):
                    raise ConvcoreError(f"WeightLoader: unknown torch dtype {dtype!r}")
                self.dtype = getattr(torch, name)

    # the mapping -----------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        return self.get_layer(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._table.rows)

    def __len__(self) -> int:
        return len(self._table.rows)

    def __contains__(self, name: object) -> bool:
        return name in self._table.rows

    def __repr__(self) -> str:
        return f"WeightLoader({str(self.path)!r}, {len(self)} tensors, schema V{self.schema_version})"

    # reading ---------------------------------------------------------------------
    def _row(self, name: str) -> Row:
        try:
            return self._table.rows[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {name!r}") from None

    def get_layer(self, name: str) -> Any:
        """Tensor ``name``: reads its row group only (data, and for V2 rows the scales and
        zero points), dequantizing a quantized row; a chunked tensor's row groups one at a
        time, each put in place in the result."""
        array = self._table.tensor(self._row(name))
        return array if self._torch is None else self._to_torch(array)

    def load_weights(self) -> dict[str, Any]:
        """Every tensor, read one row group at a time."""
        return {name: self.get_layer(name) for name in self}

    def info(self, name: str) -> dict[str, Any]:
        """What the small columns say about ``name`` (nothing else is read); ``row_group``:
        its first, ``chunks``: how many rows it takes."""
        row = self._row(name)
        return {"shape": row.shape, "dtype": self._table.out_dtype(row), "stored_dtype": row.dtype,
                "quant_type": row.quant or None, "quant_axis": row.axis, "group_size": row.group,
                "file": str(self._table.files[row.part]), "row_group": row.row_group,
                "chunks": len(row.chunks) or 1}

    def _to_torch(self, array: np.ndarray) -> Any:
        torch = self._torch
        if not array.flags.writeable:
            array = array.copy()  # torch wants writable memory; Arrow's buffers are read-only
        if array.dtype.name == "bfloat16":  # numpy has no bf16: hand torch its bits
            tensor = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(array)
        moves = {k: v for k, v in (("device", self.device), ("dtype", self.dtype)) if v is not None}
        return tensor.to(**moves)

    # what travels with the weights -------------------------------------------------
    @property
    def schema_version(self) -> int:
        return self._table.version

    @property
    def config(self) -> dict[str, Any] | None:
        """config.json from the file's metadata (None for files that carry none)."""
        return kvmeta.decode(self._table.kv, str(self.path))[0]

    @property
    def tokenizer(self) -> dict[str, bytes]:
        return kvmeta.decode(self._table.kv, str(self.path))[1]

    @property
    def metadata(self) -> dict[str, str]:
        """The file's key-value metadata, as text."""
        return dict(self._table.kv)
