"""Peak memory of MoE conversions: a Mixtral-shaped bf16 model (hidden 2048, 8 experts of
ffn 5632, 4 layers: each layer's stacked expert projection is 185 MB in bf16, 369 MB in
f32) to gguf and mlx, beside mlx_lm.convert for mlx. The issue's bar: one stacked expert
tensor plus the usual 400 MB.

    .venv/bin/python bench/moe_memory.py
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import measure, python, random_bf16_model, table

CONFIG = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 2048,
    "intermediate_size": 5632, "num_hidden_layers": 4, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": False, "hidden_act": "silu",
    "num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": None,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16", "router_aux_loss_coef": 0.02,
}


def tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, f, v, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_local_experts"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "block_sparse_moe.gate.weight", (n, h))]
        for x in range(n):
            e = f"{p}block_sparse_moe.experts.{x}."
            out += [(e + "w1.weight", (f, h)), (e + "w2.weight", (h, f)), (e + "w3.weight", (f, h))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def model() -> Path:
    return random_bf16_model("mixtral-4l-bf16", CONFIG, tensors(CONFIG))


def main() -> None:
    # built in a child: a child of this process would start with its peak RSS
    subprocess.run([python(), __file__, "--build"], check=True)
    src = model()
    work = Path(tempfile.mkdtemp(prefix="convcore-bench-moe-"))
    env = {"OMP_NUM_THREADS": "2"}
    runs = [("gguf f16", "gguf", ["--quant", "f16"], "m.gguf"),
            ("gguf q4_k_m", "gguf", ["--quant", "q4_k_m"], "q.gguf"),
            ("mlx bf16", "mlx", [], "mlx-bf16"),
            ("mlx int4-g64", "mlx", ["--quant", "int4-g64"], "mlx-q4")]
    rows = []
    try:
        for label, fmt, args, out in runs:
            rows.append(measure(f"convcore run --to {label}",
                                [python(), "-m", "convcore", "run", str(src), "-o", str(work / out),
                                 "--to", fmt, *args, "-q", "--no-validate"], env=env))
        rows.append(measure("convcore run gguf q4_k_m --to hf",
                            [python(), "-m", "convcore", "run", str(work / "q.gguf"), "-o",
                             str(work / "back"), "--to", "hf", "-q", "--no-validate"], env=env))
        theirs = measure("mlx_lm convert -q --q-bits 4 --q-group-size 64",
                         [python(), "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path",
                          str(work / "theirs"), "-q", "--q-bits", "4", "--q-group-size", "64"], env=env)
        print(table("Mixtral-shaped MoE, 4 layers x 8 experts of 5632, bf16 (2.5 GB; a stack 185 MB)", rows + [theirs],
                    baseline=theirs))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--build"]:
        model()
    else:
        main()
