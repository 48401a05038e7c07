"""hf <-> parquet on the 1.1B bench model (V1 bf16, V2 int8-row), beside safetensors' own
save of the same tensors (loaded with ``safe_open``, saved with ``save_file``), in the
same run; then ``WeightLoader.get_layer`` of one ffn weight: latency and bytes read; and
the same conversions of a one-tensor model (256x2048 bf16), which show what the process
itself takes (interpreter, pyarrow, and with --quant the Numba kernels).

    .venv/bin/python bench/parquet_vs_safetensors.py [--repeat N]

Each command runs in its own child process; wall time and peak RSS come from wait4.
The conversions run with ``--no-validate`` (validation reads the whole file back; one
row with it shows its cost). The source is read once first so every row starts from a
warm page cache.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from harness import bench_model, measure, python, table

SAFETENSORS = """
import sys
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
tensors = {}
for file in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    with safe_open(str(file), "pt") as f:
        for name in f.keys():
            tensors[name] = f.get_tensor(name)
save_file(tensors, sys.argv[2], metadata={"format": "pt"})
"""

GET_LAYER = """
import json, sys, time
import pyarrow.parquet as pq
from conv_parquet import WeightLoader

def rchar():
    for line in open("/proc/self/io"):
        if line.startswith("rchar:"):
            return int(line.split()[1])

path, name, warm = sys.argv[1], sys.argv[2], sys.argv[3]
t0 = time.perf_counter()
weights = WeightLoader(path)
open_s = time.perf_counter() - t0
weights.get_layer(warm)  # imports (numba for V2) are not the tensor's cost
info = weights.info(name)
meta = pq.read_metadata(info["file"])
chunk = sum(meta.row_group(g).column(c).total_compressed_size  # a chunked tensor's rows follow each other
            for g in range(info["row_group"], info["row_group"] + info["chunks"])
            for c in range(meta.num_columns) if meta.schema.column(c).name in ("data", "scales", "zero_points"))
times, reads = [], []
for _ in range(7):
    r0, t0 = rchar(), time.perf_counter()
    array = weights.get_layer(name)
    times.append(time.perf_counter() - t0)
    reads.append(rchar() - r0)
times.sort()
stored = 2 * array.size  # the bf16 tensor's bytes
print(json.dumps({"open_ms": open_s * 1e3, "slowest_ms": times[-1] * 1e3, "median_ms": times[3] * 1e3,
                  "best_ms": times[0] * 1e3, "read": max(reads), "chunk": chunk, "tensor": stored}))
"""

FFN = "model.layers.10.mlp.up_proj.weight"
WARM = "model.layers.0.mlp.up_proj.weight"


def convcore(*args: str) -> list[str]:
    return [python(), "-m", "convcore", "run", *args, "-q"]


def get_layer(path: Path) -> dict:
    out = subprocess.run([python(), "-c", GET_LAYER, str(path), FFN, WARM], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def tiny_model(path: Path) -> Path:
    """A one-tensor model in ``path``: what a conversion costs apart from the tensors."""
    import numpy as np

    import convcore

    array = convcore.cast(np.random.default_rng(0).standard_normal((256, 2048), dtype=np.float32), "bf16")
    path.mkdir()
    convcore.write_sharded(path, [convcore.PlannedTensor("model.layers.0.mlp.up_proj.weight", "bf16",
                                                         array.shape, lambda: [array])],
                           max_shard_size=1 << 40)
    (path / "config.json").write_text('{"model_type": "llama"}')
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=1)
    repeat = parser.parse_args().repeat
    src = bench_model()
    for file in src.glob("*.safetensors"):  # warm the page cache for every row alike
        with open(file, "rb") as f:
            while f.read(1 << 24):
                pass
    work = Path(tempfile.mkdtemp(prefix="convcore-bench-parquet-"))
    env = {"OMP_NUM_THREADS": "2"}
    try:
        writes, reads = [], []
        for _ in range(repeat):
            peer = measure("safetensors safe_open + save_file (bf16)",
                           [python(), "-c", SAFETENSORS, str(src), str(work / "peer.safetensors")], env=env)
            for name in ("peer.safetensors", "v1.parquet", "v2.parquet"):
                (work / name).unlink(missing_ok=True)
            v1 = measure("convcore run --to parquet (V1 bf16)",
                         convcore(str(src), "-o", str(work / "v1.parquet"), "--to", "parquet", "--no-validate"), env=env)
            v2 = measure("convcore run --to parquet --quant int8-row (V2)",
                         convcore(str(src), "-o", str(work / "v2.parquet"), "--to", "parquet", "--quant",
                                  "int8-row", "--no-validate"), env=env)
            writes += [peer, v1, v2]
            reads += [measure(f"convcore run {name}.parquet --to hf",
                              convcore(str(work / f"{name}.parquet"), "-o", str(work / f"back-{name}"), "--to", "hf",
                                       "--no-validate"), env=env) for name in ("v1", "v2")]
            for name in ("back-v1", "back-v2"):
                shutil.rmtree(work / name, ignore_errors=True)
        # once each: what validation costs, and the two options that trade size or quality for speed
        writes.append(measure("convcore run --to parquet (V1 bf16, validated)",
                              convcore(str(src), "-o", str(work / "v1-checked.parquet"), "--to", "parquet"), env=env))
        writes.append(measure("convcore run --to parquet -O compression=none (V1 bf16)",
                              convcore(str(src), "-o", str(work / "plain.parquet"), "--to", "parquet",
                                       "-O", "compression=none", "--no-validate"), env=env))
        writes.append(measure("convcore run --to parquet --quant int8-row -O row_search=minmax",
                              convcore(str(src), "-o", str(work / "minmax.parquet"), "--to", "parquet", "--quant",
                                       "int8-row", "-O", "row_search=minmax", "--no-validate"), env=env))
        reads.append(measure("convcore run plain.parquet (compression=none) --to hf",
                             convcore(str(work / "plain.parquet"), "-o", str(work / "back-plain"), "--to", "hf",
                                      "--no-validate"), env=env))
        tiny = tiny_model(work / "tiny")
        alone = [measure("convcore run --to parquet (one 1 MB tensor)",
                         convcore(str(tiny), "-o", str(work / "t1.parquet"), "--to", "parquet", "--no-validate"),
                         env=env),
                 measure("convcore run --to parquet --quant int8-row (one 1 MB tensor)",
                         convcore(str(tiny), "-o", str(work / "t2.parquet"), "--to", "parquet", "--quant",
                                  "int8-row", "--no-validate"), env=env)]
        alone += [measure(f"convcore run {name}.parquet --to hf (one 1 MB tensor)",
                          convcore(str(work / f"{name}.parquet"), "-o", str(work / f"back-{name}"), "--to", "hf",
                                   "--no-validate"), env=env) for name in ("t1", "t2")]
        print(table("hf -> parquet (1.1B bf16 source)", writes, baseline=writes[0]))
        print(table("parquet -> hf (1.1B)", reads))
        print(table("the process itself: the same conversions of a one-tensor model", alone))
        sizes = {n: (work / f"{n}.parquet").stat().st_size / 1e6 for n in ("v1", "v2")}
        print(f"file sizes: V1 bf16 {sizes['v1']:.0f} MB, V2 int8-row {sizes['v2']:.0f} MB "
              f"(safetensors bf16: {sum(f.stat().st_size for f in src.glob('*.safetensors')) / 1e6:.0f} MB)\n")
        print(f"#### WeightLoader.get_layer({FFN!r}), 7 calls after a warm-up on another tensor\n")
        print("| file | open ms | median ms | slowest ms | bytes read | column chunks | read / tensor bytes |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name in ("v1", "v2"):
            g = get_layer(work / f"{name}.parquet")
            print(f"| {name} | {g['open_ms']:.0f} | {g['median_ms']:.1f} | {g['slowest_ms']:.1f} | {g['read']} "
                  f"| {g['chunk']} | {g['read'] / g['tensor']:.3f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
