"""Benchmark harness: the 1.1B bench model, and wall time + peak RSS of a command.

Each measured command runs in its own child process; its peak resident memory is the
kernel's own account (``ru_maxrss`` from ``wait4``), so nothing in this process counts.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# TinyLlama-1.1B's shape.
BENCH_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
    "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
    "initializer_range": 0.02, "attention_bias": False, "mlp_bias": False,
}


def cache_root() -> Path:
    root = Path(os.environ.get("CONVCORE_CACHE", Path.home() / ".cache" / "convcore"))
    return root / "bench"


def bench_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def bench_model() -> Path:
    """The TinyLlama-1.1B-shaped bf16 model (random weights, 1 GB shards, a real
    SentencePiece tokenizer), built once under the cache dir and reused."""
    return random_bf16_model("tinyllama-1.1b-bf16", BENCH_CONFIG, bench_tensors(BENCH_CONFIG))


def random_bf16_model(name: str, config: dict, tensors: list[tuple[str, tuple[int, ...]]]) -> Path:
    """A bf16 HF model ``name`` under the bench cache: ``tensors`` (name, shape) with random
    weights (matrices N(0, 0.02), vectors 1 + N(0, 0.1)), ``config`` and a SentencePiece
    tokenizer; built once, reused."""
    import convcore
    from convcore.testing.models import spm_tokenizer

    path = cache_root() / name
    if (path / "config.json").exists():
        return path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def produce(shape):
        def make():
            x = rng.standard_normal(shape, dtype=np.float32)
            x *= 0.02 if len(shape) >= 2 else 0.1
            if len(shape) == 1:
                x += 1.0
            return convcore.cast(x, "bf16")
        return make

    planned = [convcore.PlannedTensor(n, "bf16", s, produce(s)) for n, s in tensors]
    convcore.write_sharded(tmp, planned, max_shard_size=1_000_000_000, metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    spm_tokenizer(tmp)
    tmp.rename(path)
    return path


@dataclass
class Measurement:
    label: str
    wall_s: float
    peak_rss_mb: float
    returncode: int

    def row(self) -> str:
        return f"| {self.label} | {self.wall_s:.1f} | {self.peak_rss_mb:.0f} |"


def measure(label: str, cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> Measurement:
    """Run ``cmd`` in a child; its wall time and peak RSS (MB, from wait4)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    # stderr goes to a file, not a pipe: a chatty child (onnxruntime-genai's builder logs
    # every node) would fill a pipe nobody reads until wait4 returns, and block forever
    # earlier runs' dirty pages go to disk first: otherwise a run pays for the writeback
    # of the one before it (a 2.2 GB gguf took 3.4 s after a sync, 6.7 s right after another)
    os.sync()
    with tempfile.TemporaryFile() as errfile:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=full_env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=errfile)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        errfile.seek(0)
        err = errfile.read().decode(errors="replace")
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    if code != 0:
        print(f"[bench] {label} failed ({code}): {err.strip().splitlines()[-1:] }", file=sys.stderr)
    return Measurement(label, wall, usage.ru_maxrss / 1024, code)


def python() -> str:
    return sys.executable


def table(title: str, rows: list[Measurement], baseline: Measurement | None = None) -> str:
    lines = [f"#### {title}", "", "| command | wall s | peak RSS MB |" +
             (" time ratio | RSS ratio |" if baseline else ""),
             "| --- | ---: | ---: |" + (" ---: | ---: |" if baseline else "")]
    for m in rows:
        line = m.row()
        if baseline:
            line += f" {m.wall_s / baseline.wall_s:.2f} | {m.peak_rss_mb / baseline.peak_rss_mb:.2f} |"
        lines.append(line)
    return "\n".join(lines) + "\n"
