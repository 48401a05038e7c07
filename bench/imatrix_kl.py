"""What an importance matrix buys, on trained weights: KL of each GGUF type against the
source, with and without ``--imatrix``, in llama.cpp.

No hub here, so the model is trained here: a llama of hidden 256, 4 layers (4 heads, 1 KV
head: Llama-3's grouping), FFN 768, on the test kit's English corpus (300 KB) for
``--steps`` AdamW steps of 8 x 128 tokens (cached under the bench cache; minutes on 2
cores). Trained weights have what random ones lack (outlier columns, uneven
activations), which is what an importance matrix exploits. The matrix is made with ``convcore imatrix`` on the corpus;
KL, perplexity and sizes come from ``convcore sweep --imatrix`` on the held-out
``convcore/data/eval.txt`` (llama.cpp against transformers f32).

    .venv/bin/python bench/imatrix_kl.py [--steps 300] [--quant q4_k_m,q2_k,iq4_xs,...]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from harness import ROOT, cache_root

CORPUS = ROOT / "convcore" / "testing" / "data" / "corpus.txt"
EVAL = ROOT / "convcore" / "data" / "eval.txt"
DEFAULT_QUANTS = "q2_k,q3_k_m,q4_k_m,iq4_xs,iq4_nl,iq3_s,iq3_xxs,iq2_xs"


def trained_model(steps: int, seq: int = 128, batch: int = 8) -> Path:
    """A small llama trained on the corpus (built once per setting, then cached)."""
    out = cache_root() / f"trained-llama-h256-l4-s{steps}"
    if (out / "config.json").exists():
        return out
    import numpy as np
    import torch
    import transformers

    from convcore.testing.models import make_tiny_model

    tmp = out.with_name(out.name + ".tmp")
    make_tiny_model(tmp, "llama", hidden=256, layers=4, heads=4, kv_heads=1, ffn=768, tie=False)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32)
    ids = np.array(tok(CORPUS.read_text(encoding="utf-8"))["input_ids"], dtype=np.int64)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        starts = rng.integers(0, len(ids) - seq - 1, batch)
        x = torch.tensor(np.stack([ids[s:s + seq] for s in starts]))
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f}", file=sys.stderr)
    model.eval()
    model.save_pretrained(str(tmp))
    tmp.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--quant", default=DEFAULT_QUANTS)
    ap.add_argument("--ctx", type=int, default=128)
    args = ap.parse_args()
    model = trained_model(args.steps)
    work = cache_root() / "imatrix-kl"
    work.mkdir(parents=True, exist_ok=True)
    matrix = work / f"{model.name}.imatrix.gguf"
    convcore = [sys.executable, "-m", "convcore"]
    if not matrix.exists():
        subprocess.run(convcore + ["imatrix", str(model), "--text", str(CORPUS), "--ctx", str(args.ctx),
                                   "-o", str(matrix), "-q"], check=True)
    out = work / "sweep"
    subprocess.run(convcore + ["sweep", str(model), "--to", "gguf", "--quant", args.quant, "--imatrix",
                               str(matrix), "--text", str(EVAL), "--ctx", str(args.ctx), "-o", str(out),
                               "--force", "--no-keep", "-q", "--json"], check=True, stdout=subprocess.DEVNULL)
    result = json.loads((out / "sweep.json").read_text())
    print(f"source perplexity {result['source_ppl']:.4f} on {result['tokens']} held-out tokens")
    print("| type | size (KB) | mean KL | PPL | top-1 | with imatrix: size (KB) | mean KL | PPL | top-1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    jobs = {j["quant"]: j for j in result["jobs"]}

    def cells(j: dict | None) -> str:
        if j is None or j["error"]:
            return "| – | " + ((j or {}).get("error") or "–")[:40] + " | – | – "
        return (f"| {j['size_bytes'] / 1024:.0f} | {j['kl_mean']:.4g} | {j['ppl']:.3f} "
                f"| {j['top1_agreement']:.3f} ")

    for q in args.quant.split(","):
        print(f"| {q} " + cells(jobs.get(q)) + cells(jobs.get(q + "+imatrix")) + "|")


if __name__ == "__main__":
    main()
