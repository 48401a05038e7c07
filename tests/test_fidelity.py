"""compare / run --check on real runtimes: perplexity cross-checked against transformers'
loss and llama.cpp's logits, KL and top-1 between formats, a corrupted tensor caught."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import convcore
from convcore import fidelity
from convcore.testing.models import tiny_model

CTX, LIMIT = 128, 512


@pytest.fixture(scope="module")
def src() -> Path:
    # weights 5x the default spread: peaked next-token distributions, so perplexity,
    # KL and top-1 move visibly with each quantization step
    return tiny_model("llama", init_std=0.1)


@pytest.fixture(scope="module")
def windows(src: Path) -> list[list[int]]:
    tok = fidelity.tokenizer_for(convcore.load(src))
    return fidelity.text_windows(tok, fidelity.read_text(None), CTX, LIMIT)


def test_windows_cover_the_text_with_bos(src: Path, windows: list[list[int]]) -> None:
    tok = fidelity.tokenizer_for(convcore.load(src))
    assert len(windows) == math.ceil(LIMIT / (CTX - 1))
    assert all(w[0] == tok.bos_token_id and len(w) <= CTX for w in windows)
    body = [t for w in windows for t in w[1:]]
    assert body == tok(fidelity.read_text(None), add_special_tokens=False).input_ids[:LIMIT]
    assert not fidelity.read_text(None).startswith("#")  # the licence line is dropped


def test_hf_perplexity_equals_transformers_loss(src: Path, windows: list[list[int]]) -> None:
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w])
            loss = model(ids, labels=ids).loss.item()  # mean NLL of tokens 1..n-1
            total += loss * (len(w) - 1)
            count += len(w) - 1
    want = math.exp(total / count)
    with convcore.get_registry().open_session(src) as s:
        got = fidelity.perplexity(s, windows)
    assert abs(got - want) / want <= 1e-3, (got, want)
    assert 50 < got < 5000  # a random model on real text: far from 1, far from uniform (1024)


@pytest.mark.llamacpp
def test_gguf_perplexity_equals_llamacpp(src: Path, windows: list[list[int]], tmp_path: Path) -> None:
    """Our gguf session's perplexity against one computed from llama.cpp's own logits
    (llama-cpp-python, logits_all, a fresh context per window)."""
    from llama_cpp import Llama
    gguf = tmp_path / "m.gguf"
    convcore.convert(src, gguf, to="gguf", quant="f16")
    llm = Llama(model_path=str(gguf), n_ctx=CTX, logits_all=True, verbose=False, n_threads=2)
    nll = []
    for w in windows:
        llm.reset()
        llm.eval(w)
        scores = np.array(llm.scores[:len(w)], dtype=np.float64)
        nll.append(fidelity.nll(fidelity.log_softmax(scores), w))
    want = math.exp(np.concatenate(nll).mean())
    with convcore.get_registry().open_session(gguf, options={"n_ctx": CTX}) as s:
        got = fidelity.perplexity(s, windows)
    assert abs(got - want) / want <= 1e-2, (got, want)


def _compare(run_cli, ref: Path, cand: Path, *extra: str) -> dict:
    res = run_cli("compare", ref, cand, "--ctx", CTX, "--limit", LIMIT, "--json", *extra)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.full
@pytest.mark.llamacpp
@pytest.mark.slow
def test_compare_hf_with_gguf_types(src: Path, tmp_path: Path, run_cli) -> None:
    reports = {}
    for quant in ("f32", "q8_0", "q4_k_m"):
        out = tmp_path / f"{quant}.gguf"
        convcore.convert(src, out, to="gguf", quant=quant)
        reports[quant] = _compare(run_cli, src, out)
    f32, q8, q4 = reports["f32"], reports["q8_0"], reports["q4_k_m"]
    assert f32["ppl_ref"] == q8["ppl_ref"] == q4["ppl_ref"]  # the same reference run
    assert f32["kl_mean"] < 1e-6 and f32["top1_agreement"] >= 0.99
    assert abs(f32["delta_ppl_pct"]) < 0.1
    assert 0 < f32["kl_mean"] < q8["kl_mean"] < q4["kl_mean"]
    assert q8["top1_agreement"] > q4["top1_agreement"]
    assert q4["kl_p99"] > q4["kl_mean"] and q4["tokens"] == sum(
        min(CTX, 1 + LIMIT - i) for i in range(0, LIMIT, CTX - 1))


@pytest.mark.mlx
@pytest.mark.slow
def test_compare_hf_with_mlx(src: Path, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "mlx8"
    convcore.convert(src, out, to="mlx", quant="int8-g64")
    r = _compare(run_cli, src, out)
    assert 0 < r["kl_mean"] < 0.05 and r["top1_agreement"] > 0.8


@pytest.mark.full
@pytest.mark.llamacpp
def test_corrupted_tensor_is_named_and_costs_kl(src: Path, tmp_path: Path, run_cli) -> None:
    import gguf as ggufpy
    clean = tmp_path / "clean.gguf"
    convcore.convert(src, clean, to="gguf", quant="f32")
    bad = tmp_path / "bad.gguf"
    data = bytearray(clean.read_bytes())
    reader = ggufpy.GGUFReader(str(clean))
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    start = int(t.data_offset)
    noise = np.random.default_rng(0).standard_normal(t.n_elements).astype(np.float32) * 0.5
    data[start:start + noise.nbytes] = noise.tobytes()
    bad.write_bytes(bytes(data))
    good, broken = _compare(run_cli, src, clean), _compare(run_cli, src, bad, "--tensors")
    worst = next(iter(broken["tensors"]))
    assert worst == "model.layers.1.mlp.down_proj.weight"
    assert broken["candidate_names"][worst] == "blk.1.ffn_down.weight"
    assert broken["tensors"][worst] > 1.0 and list(broken["tensors"].values())[1] == 0.0
    assert broken["kl_mean"] > 1000 * max(good["kl_mean"], 1e-9)
    res = run_cli("compare", src, bad, "--ctx", CTX, "--limit", LIMIT, "--tensors")
    assert res.returncode == 0 and "blk.1.ffn_down.weight" in res.stdout and "KL(ref||cand)" in res.stdout


def test_check_passes_within_the_dtype_tolerance(tmp_path: Path, run_cli) -> None:
    res = run_cli("run", tiny_model("llama"), "-o", tmp_path / "o", "--to", "hf", "--dtype", "f16",
                  "-q", "--check", "--check-tokens", "256")
    assert res.returncode == 0, res.stderr
    assert "check passed" in res.stderr and "KL(ref||cand)" in res.stderr


CORRUPTING = """
import sys
import numpy as np
import convcore
from convcore import hookimpl
from convcore.cli import main

class BadKernel:
    '''A third-party q8_0 kernel with a bug: one tensor's blocks come out scrambled.'''
    @hookimpl(tryfirst=True)
    def convcore_quantize(self, tensor, scheme, options):
        if scheme != "q8_0" or options.get("name") != "blk.0.ffn_up.weight":
            return None
        array = tensor if isinstance(tensor, np.ndarray) else tensor.load()
        return convcore.quantize(np.ascontiguousarray(array[::-1]), "q8_0", {})

registry = convcore.Registry()
registry.pm.register(BadKernel(), name="bad-kernel")
with convcore.using(registry):
    main(sys.argv[1:])
"""


@pytest.mark.llamacpp
def test_check_fails_on_a_broken_kernel(src: Path, tmp_path: Path) -> None:
    """A buggy quantization kernel (rows of one tensor reversed) passes validation but
    not --check: exit 3, the output left for inspection, the reason on one line."""
    limits = ("--check-kl", "0.05", "--check-top1", "0.5", "--check-tokens", "256")

    def run(out: Path, corrupt: bool) -> subprocess.CompletedProcess:
        args = ["run", str(src), "-o", str(out), "--to", "gguf", "--quant", "q8_0", "-q", "--check", *limits]
        cmd = [sys.executable, "-c", CORRUPTING, *args] if corrupt else [sys.executable, "-m", "convcore", *args]
        return subprocess.run(cmd, capture_output=True, text=True)

    clean = run(tmp_path / "clean.gguf", False)
    assert clean.returncode == 0 and "check passed" in clean.stderr, clean.stderr
    bad = run(tmp_path / "bad.gguf", True)
    assert bad.returncode == fidelity.CHECK_FAILED_EXIT == 3, bad.stderr
    assert (tmp_path / "bad.gguf").is_file()
    errors = [l for l in bad.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "beyond tolerance: mean KL" in errors[0]


def test_compare_errors_are_one_line(src: Path, tmp_path: Path, run_cli) -> None:
    res = run_cli("compare", src, src, "--text", tmp_path / "missing.txt")
    assert res.returncode == 1 and res.stderr.startswith("error: ") and "missing.txt" in res.stderr
    res = run_cli("compare", src, src, "--text", tmp_path / "x", "--tokens", "1,2")
    assert res.returncode != 0 and res.stderr.count("\n") == 1
