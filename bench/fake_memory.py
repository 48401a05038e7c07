"""convcore fake of a Llama-3-70B config: peak memory stays that of a block, whatever the
model's size. The full 80 layers (141 GB in bf16) do not fit this disk, so the run keeps 8
layers (18 GB: the 2.1 GB embedding and output layer, and 8 of the 1.7 GB layers), which
holds the largest tensors and enough layers for the peak to show.

    .venv/bin/python bench/fake_memory.py [--layers N]
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from harness import measure, python, table

from convcore.testing.models import LLAMA_70B_CONFIG


def main() -> None:
    layers = int(sys.argv[sys.argv.index("--layers") + 1]) if "--layers" in sys.argv else 8
    work = Path(tempfile.mkdtemp(prefix="convcore-bench-fake-"))
    try:
        (work / "config.json").write_text(json.dumps(LLAMA_70B_CONFIG))
        rows = [measure(f"convcore fake (Llama-3-70B config, --layers {layers}, bf16)",
                        [python(), "-m", "convcore", "fake", str(work / "config.json"), "-o", str(work / "out"),
                         "--layers", str(layers), "-q"])]
        size = sum(p.stat().st_size for p in (work / "out").glob("*.safetensors")) / 1e9
        print(table(f"fake weights, {size:.1f} GB written", rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
