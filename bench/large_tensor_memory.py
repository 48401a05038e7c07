"""Peak memory of every conversion path on a model whose largest tensor is over 2 GiB.

A one-layer llama with Gemma-3's vocabulary (262144) at hidden 2048, in f32: the
embedding (tied to the output) is 262144 x 2048 x 4 = 2.1 GB, 16x the 1.1B bench model's
largest tensor. Each conversion runs in its own child (peak RSS from wait4); the bar is
the same 400 MB as on the 1.1B model: a conversion's memory must not follow the size of
the largest tensor.

    .venv/bin/python bench/large_tensor_memory.py [--only REGEX] [--every-type]
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from harness import cache_root, measure, python

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 5632, "num_hidden_layers": 1, "num_attention_heads": 32,
    "num_key_value_heads": 4, "vocab_size": 262144, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True,
    "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    "attention_bias": False, "mlp_bias": False,
}
EMBED = "model.embed_tokens.weight"
ROWS = 8192  # rows made at a time while building (64 MB)


def tensors() -> list[tuple[str, tuple[int, ...]]]:
    h, f, v = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["vocab_size"]
    kv = h // CONFIG["num_attention_heads"] * CONFIG["num_key_value_heads"]
    p = "model.layers.0."
    return [(EMBED, (v, h)), (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)), (p + "mlp.gate_proj.weight", (f, h)),
            (p + "mlp.up_proj.weight", (f, h)), (p + "mlp.down_proj.weight", (h, f)),
            ("model.norm.weight", (h,))]


def model() -> Path:
    """The f32 model under the bench cache, built once (a block of rows at a time)."""
    import convcore
    from convcore.testing.models import spm_tokenizer

    path = cache_root() / "llama-vocab262k-f32"
    if (path / "config.json").exists():
        return path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def produce(shape):
        def make():
            for a in range(0, shape[0], ROWS):
                rows = (min(ROWS, shape[0] - a),) + shape[1:]
                x = rng.standard_normal(rows, dtype=np.float32)
                if len(shape) == 1:
                    yield x * 0.1 + 1.0
                else:
                    yield (x * 0.02).reshape(-1)
        return make

    planned = [convcore.PlannedTensor(n, "f32", s, produce(s)) for n, s in tensors()]
    convcore.write_sharded(tmp, planned, max_shard_size=5_000_000_000, metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(CONFIG, indent=2))
    spm_tokenizer(tmp)
    tmp.rename(path)
    return path


# (label, source key, output name, arguments); a source key names an earlier output
RUNS = [
    ("hf -> hf f32 (re-shard)", "src", "hf-f32", ["--to", "hf"]),
    ("hf -> hf --dtype f16", "src", "hf-f16", ["--to", "hf", "--dtype", "f16"]),
    ("hf -> hf --dtype bf16", "src", "hf-bf16", ["--to", "hf", "--dtype", "bf16"]),
    ("hf -> npz --quant int8-row", "src", "npz-int8", ["--to", "npz", "--quant", "int8-row"]),
    ("hf -> npz --quant int4-row", "src", "npz-int4", ["--to", "npz", "--quant", "int4-row"]),
    ("hf -> gguf f32", "src", "m-f32.gguf", ["--to", "gguf", "--quant", "f32"]),
    ("hf -> gguf f16", "src", "m-f16.gguf", ["--to", "gguf", "--quant", "f16"]),
    ("hf -> gguf q8_0", "src", "m-q8.gguf", ["--to", "gguf", "--quant", "q8_0"]),
    ("hf -> gguf bf16", "src", "m-bf16.gguf", ["--to", "gguf", "--quant", "bf16"]),
    ("hf -> gguf q4_k_m", "src", "m-q4km.gguf", ["--to", "gguf", "--quant", "q4_k_m"]),
    ("hf -> gguf q6_k", "src", "m-q6k.gguf", ["--to", "gguf", "--quant", "q6_k"]),
    ("hf -> gguf iq4_xs", "src", "m-iq4.gguf", ["--to", "gguf", "--quant", "iq4_xs"]),
    ("hf -> parquet (f32)", "src", "v1.parquet", ["--to", "parquet"]),
    ("hf -> parquet --quant int8-row", "src", "v2.parquet", ["--to", "parquet", "--quant", "int8-row"]),
    ("hf -> mlx --dtype bf16", "src", "mlx-bf16", ["--to", "mlx", "--dtype", "bf16"]),
    ("hf -> mlx --quant int4-g64", "src", "mlx-q4", ["--to", "mlx", "--quant", "int4-g64"]),
    ("hf -> mlx --quant int8-g64", "src", "mlx-q8", ["--to", "mlx", "--quant", "int8-g64"]),
    ("hf -> onnx f32", "src", "onnx-f32", ["--to", "onnx"]),
    ("hf -> onnx --dtype f16", "src", "onnx-f16", ["--to", "onnx", "--dtype", "f16"]),
    ("hf -> onnx --quant int4-b32", "src", "onnx-q4", ["--to", "onnx", "--quant", "int4-b32"]),
    ("gguf f16 -> hf", "m-f16.gguf", "back-gguf-f16", ["--to", "hf"]),
    ("gguf q4_k_m -> hf --dtype f32", "m-q4km.gguf", "back-gguf-q4", ["--to", "hf", "--dtype", "f32"]),
    ("npz int8-row -> hf", "npz-int8", "back-npz", ["--to", "hf"]),
    ("parquet V1 f32 -> hf", "v1.parquet", "back-parquet-v1", ["--to", "hf"]),
    ("parquet V2 int8-row -> hf", "v2.parquet", "back-parquet", ["--to", "hf"]),
    ("mlx int4-g64 -> hf", "mlx-q4", "back-mlx", ["--to", "hf"]),
    ("onnx int4-b32 -> hf", "onnx-q4", "back-onnx", ["--to", "hf"]),
    ("onnx f16 -> hf", "onnx-f16", "back-onnx-f16", ["--to", "hf"]),
    ("mlx int8-g64 -> hf --dtype f32", "mlx-q8", "back-mlx-q8", ["--to", "hf", "--dtype", "f32"]),
]


def every_type() -> list[tuple[str, str, str, list[str]]]:
    """hf -> every format with every quantized type it offers, one group/block size per
    bit width, beyond the types RUNS has (the IQ types that need an importance matrix
    are refused without one: they show as failed)."""
    listed = json.loads(subprocess.run([python(), "-m", "convcore", "formats", "--json"], check=True,
                                       capture_output=True, text=True).stdout)
    done = {(args[1], args[3]) for _, src, _, args in RUNS if src == "src" and "--quant" in args}
    out = []
    for fmt in ("gguf", "npz", "parquet", "mlx", "onnx"):
        types = next(f for f in listed if f["format"] == fmt)["schemes"]
        for t in types:
            group = re.search(r"-[gb](\d+)", t)
            if t in ("f32", "f16", "bf16") or (fmt, t) in done or (group and group.group(1) not in ("64", "32")):
                continue
            if fmt == "onnx" and group and group.group(1) != "32":
                continue
            if fmt in ("mlx", "parquet") and group and group.group(1) != "64":
                continue
            out.append((f"hf -> {fmt} --quant {t}", "src", f"every-{fmt}-{t}", ["--to", fmt, "--quant", t]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="", help="run the conversions whose label matches")
    parser.add_argument("--every-type", action="store_true",
                        help="instead: hf -> each format with each other quantized type it offers")
    args_ = parser.parse_args()
    only = re.compile(args_.only)
    runs = every_type() if args_.every_type else RUNS
    # built in a child: a child of this process would start with its peak RSS
    subprocess.run([python(), __file__, "--build"], check=True)
    src = model()
    largest = max(np.prod(s) for _, s in tensors()) * 4
    work = Path(tempfile.mkdtemp(prefix="convcore-bench-large-"))
    outputs = {"src": src}
    env = {"OMP_NUM_THREADS": "2"}
    rows = []
    try:
        for label, source, out, args in runs:
            if not only.search(label):
                continue
            if source not in outputs:
                print(f"[bench] {label}: skipped ({source} not made in this run)", file=sys.stderr)
                continue
            dst = work / out
            m = measure(label, [python(), "-m", "convcore", "run", str(outputs[source]), "-o", str(dst),
                                *args, "--no-validate", "-q"], env=env)
            if m.returncode == 0:
                outputs[out] = dst
            rows.append(m)
            print(f"{label}: {m.wall_s:.1f} s, {m.peak_rss_mb:.0f} MB", file=sys.stderr, flush=True)
            for key, path in list(outputs.items()):  # outputs nobody reads later go at once
                later = runs[runs.index((label, source, out, args)) + 1:]
                if key != "src" and not any(s == key for _, s, _, _ in later):
                    (shutil.rmtree if path.is_dir() else Path.unlink)(path)
                    del outputs[key]
        print(f"#### largest tensor {EMBED} {largest / 1e9:.2f} GB (f32), source {src}\n")
        print("| path | wall s | peak RSS MB | peak / largest tensor |")
        print("| --- | ---: | ---: | ---: |")
        for m in rows:
            failed = "" if m.returncode == 0 else f" (failed, exit {m.returncode})"
            print(f"| {m.label}{failed} | {m.wall_s:.1f} | {m.peak_rss_mb:.0f} | {m.peak_rss_mb * 1e6 / largest:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--build"]:
        model()
    else:
        main()
