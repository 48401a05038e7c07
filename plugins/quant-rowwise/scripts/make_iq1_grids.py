"""Write quant_rowwise/data/iq1_grids.npz from llama.cpp's ggml-common.h.

    python plugins/quant-rowwise/scripts/make_iq1_grids.py path/to/ggml-common.h

The file holds ``iq1s_grid``: int8 (2048, 8), the eight values (-1, 0 or +1) of each
IQ1_S / IQ1_M grid point, in ggml's order (a block stores the row number). The table is
data, not code: this script parses it out of the header once, and checks what it can
(the size, the value set, no repeated point).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "quant_rowwise" / "data" / "iq1_grids.npz"


def table(header: str, name: str) -> list[int]:
    """The integers of the GGML_TABLE ``name`` in the text of ggml-common.h."""
    m = re.search(r"GGML_TABLE_BEGIN\(\s*\w+\s*,\s*" + name + r"\s*,[^)]*\)(.*?)GGML_TABLE_END\(\)",
                  header, re.S)
    if m is None:
        raise SystemExit(f"no table {name} found in the header")
    return [int(v, 0) for v in re.findall(r"0x[0-9a-fA-F]+|\d+", m.group(1))]


def iq1s_grid(header: str) -> np.ndarray:
    """iq1s_grid as int8 (2048, 8): each uint64 entry is eight little-endian int8 values."""
    words = np.array(table(header, "iq1s_grid"), dtype=np.uint64)
    if words.shape != (2048,):
        raise SystemExit(f"iq1s_grid: expected 2048 entries, found {words.size}")
    grid = words.view(np.int8).reshape(2048, 8) if sys.byteorder == "little" else \
        words.byteswap().view(np.int8).reshape(2048, 8)
    if not np.isin(grid, (-1, 0, 1)).all():
        raise SystemExit("iq1s_grid: values other than -1, 0, 1")
    if len({row.tobytes() for row in grid}) != 2048:
        raise SystemExit("iq1s_grid: repeated grid points")
    return grid


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    grid = iq1s_grid(Path(argv[0]).read_text())
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, iq1s_grid=grid)
    print(f"wrote {OUT} (iq1s_grid {grid.shape})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
