"""hf -> hf on the 1.1B bench model: bf16 re-shard and bf16 -> f16, beside transformers'
own from_pretrained + save_pretrained doing the same, in the same run.

    .venv/bin/python bench/hf_to_hf.py
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from harness import bench_model, measure, python, table

TRANSFORMERS = """
import sys, torch
from transformers import AutoModelForCausalLM
dtype = {"bf16": torch.bfloat16, "f16": torch.float16}[sys.argv[3]]
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=dtype)
m.save_pretrained(sys.argv[2], max_shard_size="2GB")
"""


def main() -> None:
    src = bench_model()
    work = Path(tempfile.mkdtemp(prefix="convcore-bench-"))
    try:
        out = []
        for dtype in ("bf16", "f16"):
            extra = ["--dtype", dtype] if dtype == "f16" else []
            ours = measure(f"convcore run --to hf {' '.join(extra) or '(bf16 re-shard, 2G shards)'}",
                           [python(), "-m", "convcore", "run", str(src), "-o", str(work / f"ours-{dtype}"),
                            "--to", "hf", "--split-max-size", "2G", "-q", *extra])
            peer = measure(f"transformers from_pretrained+save_pretrained {dtype}",
                           [python(), "-c", TRANSFORMERS, str(src), str(work / f"tf-{dtype}"), dtype])
            out.append(table(f"hf -> hf {dtype} (1.1B, bf16 source)", [ours, peer], baseline=peer))
            shutil.rmtree(work / f"ours-{dtype}", ignore_errors=True)
            shutil.rmtree(work / f"tf-{dtype}", ignore_errors=True)
        print("\n".join(out))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
