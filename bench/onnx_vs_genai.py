"""hf -> onnx on the 1.1B bench model (bf16 source): convcore's direct builder beside
onnxruntime-genai's model builder with the same settings (f32, f16, int4 block 32
symmetric, CPU), and f32 beside torch.onnx.export (convcore's ``-O path=export``), in
the same run.

    .venv/bin/python bench/onnx_vs_genai.py [--skip-export]

Each command runs in its own child process; wall time and peak RSS come from wait4.
The conversions run with ``--no-validate``; the source is read once first so every row
starts from a warm page cache. Outputs are deleted after each row (4.4 GB each in f32).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from harness import bench_model, measure, python, table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-export", action="store_true", help="skip the torch.onnx.export row")
    args = parser.parse_args()
    src = bench_model()
    for file in src.glob("*.safetensors"):
        with open(file, "rb") as f:
            while f.read(1 << 24):
                pass
    work = Path(tempfile.mkdtemp(prefix="convcore-bench-onnx-"))
    env = {"OMP_NUM_THREADS": "2"}
    tables: list[str] = []
    try:
        for label, peer_p, ours in (("f32", "fp32", ["--dtype", "f32"]), ("f16", "fp16", ["--dtype", "f16"]),
                                    ("int4 block 32 symmetric", "int4", ["--dtype", "f32", "--quant", "int4-b32"])):
            peer = measure(f"onnxruntime-genai builder -p {peer_p} -e cpu",
                           [python(), "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o",
                            str(work / "peer"), "-p", peer_p, "-e", "cpu", "-c", str(work / "cache")], env=env)
            shutil.rmtree(work / "peer", ignore_errors=True)
            shutil.rmtree(work / "cache", ignore_errors=True)
            mine = measure(f"convcore run --to onnx {' '.join(ours)}",
                           [python(), "-m", "convcore", "run", str(src), "--to", "onnx", "-o", str(work / "ours"),
                            *ours, "--no-validate", "-q"], env=env)
            shutil.rmtree(work / "ours", ignore_errors=True)
            rows = [peer, mine]
            if label == "f32" and not args.skip_export:
                rows.append(measure("convcore run --to onnx -O path=export (torch.onnx.export, dynamo)",
                                    [python(), "-m", "convcore", "run", str(src), "--to", "onnx", "-o",
                                     str(work / "export"), "--dtype", "f32", "-O", "path=export",
                                     "--no-validate", "-q"], env=env))
                shutil.rmtree(work / "export", ignore_errors=True)
            tables.append(table(f"hf -> onnx {label} (1.1B bf16 source)", rows, baseline=peer))
            print(tables[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
