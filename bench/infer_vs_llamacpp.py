"""Greedy generation of 64 tokens from the 1.1B bench model as gguf q4_k_m:
``convcore infer --max-tokens 64`` beside llama-cpp-python's own generation loop, same
run, same threads, model load included in both (each is one child process).

    .venv/bin/python bench/infer_vs_llamacpp.py [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

from harness import bench_model, cache_root, measure, python

PROMPT = "1,450,4086,310,3444,338,263,4086,1058"   # fixed ids: no tokenizer on either side
THREADS = 2
PEER = """
import sys, llama_cpp
ids = [int(t) for t in sys.argv[2].split(",")]
# f32 KV cache as convcore's session keeps it, so both compute the same 64 tokens
llm = llama_cpp.Llama(sys.argv[1], n_ctx=128, n_threads=int(sys.argv[3]), verbose=False,
                      type_k=0, type_v=0)
out = []
for token in llm.generate(ids, top_k=1, temp=0.0):
    out.append(token)
    if len(out) == 64:
        break
print(",".join(map(str, out)))
"""


def q4_k_m_file():
    """The bench model as q4_k_m GGUF, made once by convcore and kept in the cache."""
    path = cache_root() / "tinyllama-1.1b-q4_k_m.gguf"
    if not path.exists():
        subprocess.run([python(), "-m", "convcore", "run", str(bench_model()), "-o", str(path),
                        "--to", "gguf", "--quant", "q4_k_m", "-q"], check=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    model = q4_k_m_file()
    ours_cmd = [python(), "-m", "convcore", "infer", str(model), "--tokens", PROMPT,
                "--max-tokens", "64", "--ignore-eos", "--threads", str(THREADS)]
    env: dict[str, str] = {}
    # the same 64 ids on both sides, or the comparison is void
    a = subprocess.run(ours_cmd, capture_output=True, text=True, env={**os.environ, **env}).stdout.split()
    b = subprocess.run([python(), "-c", PEER, str(model), PROMPT, str(THREADS)],
                       capture_output=True, text=True).stdout.split()
    same = a == b
    ours, theirs = [], []
    for _ in range(rounds):   # alternate, so drift on a shared VM hits both sides
        ours.append(measure("convcore infer --max-tokens 64", ours_cmd, env=env))
        theirs.append(measure("llama-cpp-python generate 64",
                              [python(), "-c", PEER, str(model), PROMPT, str(THREADS)]))
    print("| command | best wall s | median wall s | peak RSS MB |")
    print("| --- | ---: | ---: | ---: |")
    for runs in (ours, theirs):
        walls = [m.wall_s for m in runs]
        print(f"| {runs[0].label} | {min(walls):.2f} | {statistics.median(walls):.2f} | "
              f"{max(m.peak_rss_mb for m in runs):.0f} |")
    best = min(m.wall_s for m in ours) / min(m.wall_s for m in theirs)
    med = statistics.median(m.wall_s for m in ours) / statistics.median(m.wall_s for m in theirs)
    print(f"\ntime ratio ours/llama-cpp-python: best {best:.2f}, median {med:.2f}; "
          f"{THREADS} threads; same 64 token ids on both sides: {same}")
    if not same:
        print(f"ours:   {a}\ntheirs: {b}", file=sys.stderr)


if __name__ == "__main__":
    main()
