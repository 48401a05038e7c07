"""convcore sweep: one source converted to many gguf types, each measured against the
source (KL, perplexity), timed in llama.cpp, tabled, plotted and recommended from."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from convcore_sweep import sweep as sweeping
from convcore.model import ConvcoreError
from convcore.registry import get_registry
from convcore.testing.models import tiny_model

QUANTS = ["q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k"]
ORDER = ["q8_0", "q6_k", "q4_k_m", "q2_k"]   # KL rises and size falls along this
FAST = ["--limit", "512", "--ctx", "128", "--gen-tokens", "8"]
NUMBERS = ("size_bytes", "ppl", "delta_ppl", "delta_ppl_pct", "kl_mean", "kl_p99",
           "top1_agreement", "tokens_per_s", "seconds_to_convert")


@pytest.fixture(scope="module")
def src() -> Path:
    # init_std 0.1: peaked next-token distributions, so KL orders the types
    return tiny_model("llama", init_std=0.1)


@pytest.fixture(scope="module")
def swept(src: Path, tmp_path_factory) -> tuple[Path, object]:
    """One CLI sweep over six types and a bogus one, shared by the tests below."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("sweep") / "out"
    # what the run_cli fixture does (it is function-scoped; this sweep is shared)
    proc = subprocess.run(
        [sys.executable, "-m", "convcore", "sweep", str(src), "--to", "gguf",
         "--quant", ",".join(QUANTS + ["q9_z"]), *FAST, "--max-kl", "0.05", "--max-size", "1.2M",
         "-o", str(out)], capture_output=True, text=True)
    return out, proc


@pytest.mark.slow
@pytest.mark.llamacpp
def test_sweep_cli_writes_every_report(swept) -> None:
    out, proc = swept
    assert proc.returncode == 0, proc.stderr
    # stdout: the source, one line per type (largest first, failures last), then the
    # two recommendations
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines[:8]] == ["source"] + QUANTS + ["q9_z"]
    assert "failed: format gguf cannot store 'q9_z'" in lines[7]
    assert lines[8].startswith("smallest within mean KL 0.05: ")
    assert lines[9].startswith("best quality within 1.20 MB: ")
    assert len(lines) == 10
    assert "wrote " in proc.stderr and "Traceback" not in proc.stderr

    data = json.loads((out / "sweep.json").read_text())
    assert data["format"] == "gguf" and data["ctx"] == 128
    assert data["tokens"] > 500 and math.isfinite(data["source_ppl"])
    assert data["source_tokens_per_s"] > 0
    md = (out / "sweep.md").read_text()
    assert "| type | size |" in md and "| q4_k_m |" in md and "q9_z" in md
    assert "- smallest within mean KL 0.05: " in md
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    root = ET.parse(out / "sweep.svg").getroot()
    assert root.tag.endswith("svg")
    # outputs kept, with the format's suffix; the reference logits are gone
    assert sorted(p.name for p in (out / "outputs").iterdir()) == sorted(f"{q}.gguf" for q in QUANTS)
    assert not (out / sweeping.REFERENCE_DIR).exists()


@pytest.mark.slow
@pytest.mark.llamacpp
def test_sweep_numbers_order_and_recommendations(swept) -> None:
    out, _ = swept
    data = json.loads((out / "sweep.json").read_text())
    jobs = {j["quant"]: j for j in data["jobs"]}
    assert list(jobs) == QUANTS + ["q9_z"]
    assert all(set(j) >= set(sweeping.JOB_KEYS) for j in jobs.values())
    for q in QUANTS:
        j = jobs[q]
        assert j["error"] is None, j
        for key in NUMBERS:
            assert isinstance(j[key], (int, float)) and math.isfinite(j[key]), (q, key, j[key])
        assert j["size_bytes"] > 0 and j["kl_mean"] > 0 and j["tokens_per_s"] > 0
        assert 0 <= j["top1_agreement"] <= 1 and j["kl_p99"] >= j["kl_mean"]
        assert Path(j["path"]) == out / "outputs" / f"{q}.gguf"
        assert Path(j["path"]).stat().st_size == j["size_bytes"]
    kls = [jobs[q]["kl_mean"] for q in ORDER]
    sizes = [jobs[q]["size_bytes"] for q in ORDER]
    assert kls == sorted(kls) and len(set(kls)) == len(kls), kls
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes), sizes

    bad = jobs["q9_z"]
    assert "cannot store 'q9_z'" in bad["error"] and "\n" not in bad["error"]
    assert bad["kl_mean"] is None and bad["path"] is None

    assert data["pareto"] and set(data["pareto"]) <= set(QUANTS)
    rec = data["recommendations"]
    small = rec["smallest_within_kl"]
    assert small["max_kl"] == 0.05
    within = [q for q in QUANTS if jobs[q]["kl_mean"] <= 0.05]
    assert within, "q8_0 should be within 0.05 on the tiny model"
    assert small["quant"] == min(within, key=lambda q: jobs[q]["size_bytes"])
    assert jobs[small["quant"]]["kl_mean"] <= 0.05
    best = rec["best_within_size"]
    assert best["max_size"] == 1_200_000
    fits = [q for q in QUANTS if jobs[q]["size_bytes"] <= 1_200_000]
    assert best["quant"] == min(fits, key=lambda q: jobs[q]["kl_mean"])
    assert jobs[best["quant"]]["size_bytes"] <= 1_200_000
    assert small["quant"] in data["pareto"] and best["quant"] in data["pareto"]


@pytest.mark.slow
@pytest.mark.llamacpp
def test_sweep_refuses_a_used_directory_and_force_replaces_only_a_sweep(swept, src: Path, run_cli) -> None:
    out, _ = swept
    proc = run_cli("sweep", src, "--to", "gguf", "--quant", "q8_0", *FAST, "-o", out)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: {out}: exists and is not empty; pass --force to replace a previous sweep there"]

    # --force, every job failing: exit 1, the old sweep replaced (its outputs gone)
    proc = run_cli("sweep", src, "--to", "gguf", "--quant", "q9_z", *FAST, "-o", out, "--force", "-q")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: every type failed"
    assert proc.stdout.splitlines()[1].startswith("q9_z       failed: ")
    data = json.loads((out / "sweep.json").read_text())
    assert [j["quant"] for j in data["jobs"]] == ["q9_z"] and data["pareto"] == []
    assert data["recommendations"]["smallest_within_kl"]["quant"] is None
    assert not (out / "outputs").exists()

    # a directory holding anything else is refused even with --force
    (out / "notes.txt").write_text("mine")
    proc = run_cli("sweep", src, "--to", "gguf", "--quant", "q8_0", *FAST, "-o", out, "--force")
    assert proc.returncode == 1 and "notes.txt" in proc.stderr
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.slow
@pytest.mark.llamacpp
def test_sweep_python_no_keep(src: Path, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    result = sweeping.sweep(src, "gguf", ["q8_0", "f16"], tmp_path / "s", ctx=64, limit=128,
                            gen_tokens=4, keep=False, max_kl=1e-9)
    jobs = {j["quant"]: j for j in result["jobs"]}
    assert jobs["f16"]["error"] is None and jobs["f16"]["kl_mean"] < jobs["q8_0"]["kl_mean"]
    assert all(j["path"] is None for j in jobs.values())
    assert not (tmp_path / "s" / "outputs").exists()
    assert result["recommendations"]["smallest_within_kl"]["quant"] is None
    assert "none; the lowest KL is f16" in result["recommendations"]["smallest_within_kl"]["message"]
    assert result["recommendations"]["best_within_size"]["quant"] == "f16"
    assert "overall (no --max-size)" in result["recommendations"]["best_within_size"]["message"]


# pure parts: no conversion ------------------------------------------------------------
def job(quant: str, size: int | None, kl: float | None, error: str | None = None) -> dict:
    return {**dict.fromkeys(sweeping.JOB_KEYS), "quant": quant, "size_bytes": size,
            "kl_mean": kl, "ppl": None if kl is None else 10.0, "error": error}


def test_pareto_front_and_recommendations() -> None:
    jobs = [job("a", 100, 0.5), job("b", 200, 0.1), job("c", 250, 0.2),  # c: beaten by b
            job("d", 300, 0.01), job("e", 300, 0.01), job("x", None, None, "boom")]
    assert sweeping.pareto_front(jobs) == ["a", "b", "d"]
    rec = sweeping.recommend(jobs, max_kl=0.15, max_size=260)
    assert rec["smallest_within_kl"]["quant"] == "b"
    assert rec["best_within_size"]["quant"] == "b"
    assert sweeping.recommend(jobs, max_kl=1.0, max_size=None)["best_within_size"]["quant"] == "d"
    none = sweeping.recommend(jobs, max_kl=0.001, max_size=50)
    assert none["smallest_within_kl"]["quant"] is None and none["best_within_size"]["quant"] is None
    assert "none" in none["smallest_within_kl"]["message"]


def test_all_excludes_floats_unless_given() -> None:
    schemes = get_registry().format("gguf").schemes
    quants = sweeping.parse_quants(None, "gguf", True)
    assert quants == [s for s in schemes if s not in ("f32", "f16", "bf16")]
    assert sweeping.parse_quants("f16,q8_0", "gguf", True)[-1] == "f16"
    assert sweeping.parse_quants("q8_0, q4_0,q8_0", "gguf", False) == ["q8_0", "q4_0"]
    with pytest.raises(ConvcoreError, match="--quant a,b,c or --all"):
        sweeping.parse_quants("", "gguf", False)


def test_output_names_follow_the_format(tmp_path: Path) -> None:
    reg = get_registry()
    assert sweeping.output_path(tmp_path, "q4_k_m", reg.format("gguf")) == tmp_path / "outputs" / "q4_k_m.gguf"
    assert sweeping.output_path(tmp_path, "int4-g64", reg.format("mlx")) == tmp_path / "outputs" / "int4-g64"
    assert sweeping.default_out_dir(Path("/models/Llama-3.1-8B"), "gguf").name == "sweep-Llama-3.1-8B-gguf"


def test_reports_without_matplotlib(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib -> ImportError
    jobs = [job("q8_0", 2_000_000, 0.004), job("q9_z", None, None, "format gguf cannot store 'q9_z'")]
    result = {"source": "/m/tiny", "source_format": "hf", "format": "gguf", "text": "t.txt",
              "ctx": 128, "tokens": 512, "params": 1_000_000, "source_size_bytes": 4_000_000,
              "gen_tokens": 8, "source_ppl": 12.0, "source_tokens_per_s": float("nan"),
              "jobs": jobs, "pareto": sweeping.pareto_front(jobs),
              "recommendations": sweeping.recommend(jobs, 0.05, None)}
    out = sweeping.write_reports(result, tmp_path)
    assert out["plot_error"] == sweeping.PLOT_HINT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.json", "sweep.md"]
    data = json.loads((tmp_path / "sweep.json").read_text())   # NaN written as null
    assert data["source_tokens_per_s"] is None and "plot_error" not in data
    md = (tmp_path / "sweep.md").read_text()
    assert "pip install 'convcore-sweep[plot]'" in md and "| q9_z |" in md


@pytest.mark.full
@pytest.mark.llamacpp
def test_sweep_imatrix_runs_each_type_without_and_with(src: Path, tmp_path: Path) -> None:
    """--imatrix: every type twice, `<type>` and `<type>+imatrix`, the second made with the
    matrix (recorded in its output); a format without an imatrix option is refused."""
    pytest.importorskip("llama_cpp")
    import gguf
    import numpy as np

    from conv_gguf.imatrix import Imatrix, write_imatrix

    rng = np.random.default_rng(0)
    widths = {"attn_q": 256, "attn_k": 256, "attn_v": 256, "attn_output": 256, "ffn_gate": 256,
              "ffn_up": 256, "ffn_down": 512}
    names = [f"blk.{i}.{n}.weight" for i in range(2) for n in widths]
    matrix = tmp_path / "m.imatrix.gguf"
    write_imatrix(matrix, Imatrix(
        sums={n: rng.gamma(0.5, size=(1, widths[n.split(".")[2]])).astype(np.float32) * 64 for n in names},
        counts={n: np.array([64], np.float32) for n in names}, datasets=["t"], chunk_count=1, chunk_size=64))
    result = sweeping.sweep(src, "gguf", ["q4_k_m"], tmp_path / "s", ctx=64, limit=128, gen_tokens=4,
                            imatrix=matrix)
    jobs = {j["quant"]: j for j in result["jobs"]}
    assert set(jobs) == {"q4_k_m", "q4_k_m+imatrix"}
    assert all(j["error"] is None for j in jobs.values()), jobs
    assert jobs["q4_k_m"]["imatrix"] is None and jobs["q4_k_m+imatrix"]["imatrix"] == str(matrix)
    fields = gguf.GGUFReader(jobs["q4_k_m+imatrix"]["path"]).fields
    assert fields["quantize.imatrix.file"].contents() == str(matrix)
    with pytest.raises(ConvcoreError, match="format mlx takes no importance matrix"):
        sweeping.sweep(src, "mlx", ["int4-g64"], tmp_path / "t", imatrix=matrix)
