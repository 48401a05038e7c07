"""hf -> mlx on the 1.1B bench model: convcore beside ``mlx_lm.convert``, same run,
same settings (f16; int4-g64 keeping the config's bf16 for scales and norms).

    .venv/bin/python bench/mlx_vs_mlxlm.py [f16] [int4-g64]

Each command runs in its own child process; wall time and peak RSS come from wait4.
int4-g64 needs the ``int4-g64`` scheme (quant-rowwise) installed.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from harness import bench_model, measure, python, table

SETTINGS = {
    "f16": (["--quant", "f16"], ["--dtype", "float16"]),
    "int4-g64": (["--quant", "int4-g64"], ["-q", "--q-bits", "4", "--q-group-size", "64"]),
}


def main(argv: list[str]) -> None:
    settings = argv or list(SETTINGS)
    src = bench_model()
    work = Path(tempfile.mkdtemp(prefix="convcore-bench-mlx-"))
    env = {"OMP_NUM_THREADS": "2"}
    try:
        for name in settings:
            ours_args, theirs_args = SETTINGS[name]
            ours = measure(f"convcore run --to mlx {' '.join(ours_args)}",
                           [python(), "-m", "convcore", "run", str(src), "-o", str(work / f"ours-{name}"),
                            "--to", "mlx", *ours_args, "-q", "--no-validate"], env=env)
            shutil.rmtree(work / f"ours-{name}", ignore_errors=True)
            theirs = measure(f"mlx_lm convert {' '.join(theirs_args)}",
                             [python(), "-m", "mlx_lm", "convert", "--hf-path", str(src),
                              "--mlx-path", str(work / f"theirs-{name}"), *theirs_args], env=env)
            shutil.rmtree(work / f"theirs-{name}", ignore_errors=True)
            print(table(f"hf -> mlx {name} (1.1B bf16 source)", [ours, theirs], baseline=theirs))
            sys.stdout.flush()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
