"""Write quant_rowwise/data/iq3_grids.npz from llama.cpp's ggml-common.h.

    python plugins/quant-rowwise/scripts/make_iq3_grids.py path/to/ggml-common.h

The file holds two uint8 tables, the four byte values each grid point decodes to, in
ggml's order (a block stores the row number):

- ``iq3xxs_grid`` (256, 4), values in {4, 12, 20, 28, 36, 44, 52, 62} (IQ3_XXS);
- ``iq3s_grid`` (512, 4), values in {1, 3, 5, ..., 15} (IQ3_S).

Each table has eight distinct values, so a point is also four 3-bit levels (0..7, the
rank of each value), which is what the quantizer searches over; quant_rowwise.iq3_tables
derives the levels and the neighbour lists from these bytes at first use. The script
checks what it can: the sizes, the value sets, no repeated point.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "quant_rowwise" / "data" / "iq3_grids.npz"
# table name -> (points, the eight byte values it may hold)
TABLES = {
    "iq3xxs_grid": (256, (4, 12, 20, 28, 36, 44, 52, 62)),
    "iq3s_grid": (512, (1, 3, 5, 7, 9, 11, 13, 15)),
}


def table(header: str, name: str) -> list[int]:
    """The integers of the GGML_TABLE ``name`` in the text of ggml-common.h."""
    m = re.search(r"GGML_TABLE_BEGIN\(\s*\w+\s*,\s*" + name + r"\s*,[^)]*\)(.*?)GGML_TABLE_END\(\)",
                  header, re.S)
    if m is None:
        raise SystemExit(f"no table {name} found in the header")
    return [int(v, 0) for v in re.findall(r"0x[0-9a-fA-F]+|\d+", m.group(1))]


def grid_bytes(header: str, name: str) -> np.ndarray:
    """Table ``name`` as uint8 (points, 4): byte j of each uint32 entry is value j (ggml
    reads the entry's bytes in memory order on a little-endian machine)."""
    points, values = TABLES[name]
    words = np.array(table(header, name), dtype=np.uint64)
    if words.shape != (points,) or (words >> np.uint64(32)).any():
        raise SystemExit(f"{name}: expected {points} uint32 entries, found {words.size}")
    grid = ((words[:, None] >> (np.arange(4, dtype=np.uint64) * np.uint64(8))) & np.uint64(0xFF)).astype(np.uint8)
    if set(np.unique(grid).tolist()) != set(values):
        raise SystemExit(f"{name}: values {sorted(set(np.unique(grid).tolist()))}, expected {values}")
    if len({row.tobytes() for row in grid}) != points:
        raise SystemExit(f"{name}: repeated grid points")
    return grid


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    header = Path(argv[0]).read_text()
    grids = {name: grid_bytes(header, name) for name in TABLES}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **grids)
    print(f"wrote {OUT} ({', '.join(f'{k} {v.shape}' for k, v in grids.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
