"""gguf (q4_k_m) -> hf on the 1.1B bench model, beside gguf-py dequantizing the same file.

The peer is gguf-py's own reader and ``gguf.quants.dequantize`` over every tensor (each
result dropped as soon as it is made, so its memory is one tensor's): the least a Python
tool built on gguf-py does to read a quantized GGUF back. Ours is the whole conversion to
an HF directory (f16 and f32), tokenizer and config included, validated or not.

    .venv/bin/python bench/gguf_to_hf.py [--repeat N]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from harness import bench_model, cache_root, measure, python, table

GGUF_PY_DEQUANTIZE_ALL = """
import sys
import gguf
from gguf.quants import dequantize
reader = gguf.GGUFReader(sys.argv[1])
for t in reader.tensors:
    dequantize(t.data, t.tensor_type)
"""


def q4_k_m_file(work: Path) -> Path:
    """The bench model as q4_k_m GGUF, made once (by convcore) and kept in the cache."""
    path = cache_root() / "tinyllama-1.1b-q4_k_m.gguf"
    if not path.exists():
        tmp = work / path.name
        code = measure("make q4_k_m", [python(), "-m", "convcore", "run", str(bench_model()), "-o",
                                       str(tmp), "--to", "gguf", "--quant", "q4_k_m", "-q"]).returncode
        if code:
            raise SystemExit("could not make the q4_k_m file")
        shutil.move(tmp, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1, help="rounds of every command (default 1)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="convcore-bench-gguf2hf-"))
    try:
        src = q4_k_m_file(work)
        rows = []
        peer = None
        for r in range(args.repeat):
            m = measure("gguf-py: GGUFReader + dequantize every tensor",
                        [python(), "-c", GGUF_PY_DEQUANTIZE_ALL, str(src)])
            peer = peer or m
            rows.append(m)
            for dtype, validate in (("f16", False), ("f32", False), ("f16", True)):
                out = work / f"out-{dtype}-{r}"
                flag = [] if validate else ["--no-validate"]
                rows.append(measure(f"convcore run --to hf --dtype {dtype}"
                                    + (" (validated)" if validate else ""),
                                    [python(), "-m", "convcore", "run", str(src), "-o", str(out),
                                     "--to", "hf", "--dtype", dtype, "-q", *flag]))
                shutil.rmtree(out, ignore_errors=True)
        print(table("gguf (q4_k_m) -> hf, 1.1B", rows, baseline=peer))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
