"""Write quant_rowwise/data/iq2_grids.npz: the IQ2 grids of llama.cpp's ggml-common.h.

    python plugins/quant-rowwise/scripts/make_iq2_grids.py PATH/TO/ggml-common.h

Each grid is stored as ggml declares it: one uint64 per grid point, its eight bytes the
point's coordinates (0x08, 0x19 or 0x2b). Run once per change of ggml's grids; the
kernels derive their 2-bit codes and neighbour tables from these numbers at first use.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

# npz key -> (ggml table name, points)
TABLES = {"iq2_xxs": ("iq2xxs_grid", 256), "iq2_xs": ("iq2xs_grid", 512),
          "iq2_s": ("iq2s_grid", 1024)}
OUT = Path(__file__).resolve().parents[1] / "quant_rowwise" / "data" / "iq2_grids.npz"


def table(source: str, name: str, size: int) -> np.ndarray:
    """The numbers of ``GGML_TABLE_BEGIN(uint64_t, name, size) ... GGML_TABLE_END()``."""
    m = re.search(rf"GGML_TABLE_BEGIN\(uint64_t,\s*{name},\s*{size}\)(.*?)GGML_TABLE_END\(\)",
                  source, re.S)
    if m is None:
        raise SystemExit(f"no uint64 table {name}[{size}] in the header")
    values = [int(v, 16) for v in re.findall(r"0x([0-9a-fA-F]+)", m.group(1))]
    if len(values) != size:
        raise SystemExit(f"{name}: expected {size} numbers, found {len(values)}")
    grid = np.array(values, dtype=np.uint64)
    coords = np.unique(grid.view(np.uint8))
    if not set(coords.tolist()) <= {0x08, 0x19, 0x2B}:
        raise SystemExit(f"{name}: unexpected coordinates {coords.tolist()}")
    return grid


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        raise SystemExit(__doc__)
    source = Path(argv[0]).read_text()
    grids = {key: table(source, name, size) for key, (name, size) in TABLES.items()}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **grids)
    print(f"wrote {OUT} ({', '.join(f'{k}: {len(v)}' for k, v in grids.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
