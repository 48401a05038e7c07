"""LoRA on the 1.1B bench model: merging a rank-16 adapter of every linear layer while
converting (hf bf16 re-save, gguf q8_0), beside the same conversion without it and beside
PEFT's own ``merge_and_unload`` + ``save_pretrained``, in the same run; and the adapter
alone to llama.cpp's adapter GGUF.

    .venv/bin/python bench/lora_merge.py
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from harness import bench_model, cache_root, measure, python, table

RANK = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_MERGE = """
import sys, torch, peft
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
m = peft.PeftModel.from_pretrained(m, sys.argv[2]).merge_and_unload()
m.save_pretrained(sys.argv[3], max_shard_size="2GB")
"""


def bench_adapter(base: Path) -> Path:
    """A PEFT LoRA folder (rank 16, every linear layer, f32 as PEFT saves it) over the
    bench model, written once beside it."""
    from safetensors.numpy import save_file

    out = cache_root() / f"lora-r{RANK}-tinyllama"
    if (out / "adapter_config.json").exists():
        return out
    config = json.loads((base / "config.json").read_text())
    h, f = config["hidden_size"], config["intermediate_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
              "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
    rng = np.random.default_rng(0)
    tensors = {}
    for i in range(config["num_hidden_layers"]):
        for t in TARGETS:
            kind = "self_attn" if t.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            stem = f"base_model.model.model.layers.{i}.{kind}.{t}"
            rows, cols = shapes[t]
            tensors[f"{stem}.lora_A.weight"] = (rng.standard_normal((RANK, cols)) / np.sqrt(cols)).astype(np.float32)
            tensors[f"{stem}.lora_B.weight"] = (rng.standard_normal((rows, RANK)) * 1e-3).astype(np.float32)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "adapter_model.safetensors"))
    (tmp / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": 32, "target_modules": list(TARGETS),
        "base_model_name_or_path": str(base), "task_type": "CAUSAL_LM", "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False}))
    tmp.rename(out)
    return out


def main() -> None:
    src = bench_model()
    adapter = bench_adapter(src)
    work = Path(tempfile.mkdtemp(prefix="convcore-bench-lora-"))
    run = [python(), "-m", "convcore", "run", str(src), "-q", "--no-validate"]
    try:
        out = []
        plain = measure("convcore run --to hf (no adapter)", [*run, "--to", "hf", "-o", str(work / "plain"),
                                                               "--split-max-size", "2G"])
        merged = measure("convcore run --to hf --lora ADAPTER", [*run, "--to", "hf", "-o", str(work / "merged"),
                                                                 "--split-max-size", "2G", "--lora", str(adapter)])
        peer = measure("peft merge_and_unload + save_pretrained",
                       [python(), "-c", PEFT_MERGE, str(src), str(adapter), str(work / "peft")])
        out.append(table("merge a rank-16 adapter into bf16 hf (1.1B)", [merged, plain, peer], baseline=peer))
        for d in ("plain", "merged", "peft"):
            shutil.rmtree(work / d, ignore_errors=True)
        plain = measure("convcore run --to gguf --quant q8_0 (no adapter)",
                        [*run, "--to", "gguf", "--quant", "q8_0", "-o", str(work / "plain.gguf")])
        merged = measure("convcore run --to gguf --quant q8_0 --lora ADAPTER",
                         [*run, "--to", "gguf", "--quant", "q8_0", "-o", str(work / "merged.gguf"),
                          "--lora", str(adapter)])
        out.append(table("merge into gguf q8_0 (1.1B)", [merged, plain], baseline=plain))
        alone = measure("convcore run ADAPTER --to gguf (f32 adapter file)",
                        [python(), "-m", "convcore", "run", str(adapter), "--base", str(src), "--to", "gguf",
                         "-o", str(work / "adapter.gguf"), "-q"])
        out.append(table("the adapter alone to llama.cpp's adapter GGUF", [alone]))
        print("\n".join(out))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
