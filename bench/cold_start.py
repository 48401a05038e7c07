"""First use after an install: a quantized conversion of a tiny (256-wide) llama with an
empty kernel cache (cold) and again with it filled (warm), and ``convcore warmup``.

Each cold row runs with ``CONVCORE_CACHE`` (and so the kernel cache) in a fresh empty
directory, as a new machine or a new package version meets it; the warm row repeats the
same command against that directory.

    .venv/bin/python bench/cold_start.py
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from harness import measure, python, table

CASES = [("q4_k_m", "gguf"), ("q8_0", "gguf"), ("int4-g64", "mlx")]


def main() -> None:
    from convcore.testing.models import tiny_model

    src = tiny_model("llama")
    work = Path(tempfile.mkdtemp(prefix="convcore-bench-cold-"))
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    try:
        rows = []
        for quant, fmt in CASES:
            cache = work / f"cache-{quant}"
            cache.mkdir()
            run_env = {**env, "CONVCORE_CACHE": str(cache)}
            for label in ("cold", "warm"):
                out = work / (f"{quant}-{label}.gguf" if fmt == "gguf" else f"{quant}-{label}")
                rows.append(measure(f"convcore run --to {fmt} --quant {quant} ({label})",
                                    [python(), "-m", "convcore", "run", str(src), "-o", str(out),
                                     "--to", fmt, "--quant", quant, "-q"], env=run_env))
        cache = work / "cache-warmup"
        cache.mkdir()
        for label in ("cold", "warm"):
            rows.append(measure(f"convcore warmup, every scheme ({label})",
                                [python(), "-m", "convcore", "warmup"],
                                env={**env, "CONVCORE_CACHE": str(cache)}))
        print(table("first use: tiny llama (hidden 256), kernel cache empty / filled", rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
