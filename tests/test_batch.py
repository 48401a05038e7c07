"""convcore batch: a fleet of six jobs (one failing) run by the local executor, resumed,
interrupted with SIGKILL and resumed again; its model registry checked against the
published schema and against the files it lists."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest

from convcore_fleet import registry as model_registry
from convcore_fleet.batch import STATE_FILE, SUMMARY_FILE
from convcore.registry import get_registry
from convcore.testing.models import tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]

OK_JOBS = ["tiny/gguf-q8_0", "tiny/gguf-f16", "tiny/mlx-int4-g64", "tiny/hf-bf16",
           "tiny/parquet-int8-row"]
BAD_JOB = "tiny/mlx-q4_k_m"


def jobs_toml(src: Path, out: str, extra: str = "") -> str:
    """Six jobs: five that work (one with --check) and one the format refuses."""
    return f"""
[batch]
out = "{out}"
jobs = 2

[[model]]
id = "tiny"
source = "{src}"
name = "Tiny Llama"
license = "apache-2.0"

[[target]]
to = "gguf"
quant = ["q8_0", "f16"]
check = {{ kl = 0.05, top1 = 0.8, tokens = 128 }}

[[target]]
to = "mlx"
quant = ["int4-g64", "q4_k_m"]

[[target]]
to = "hf"
dtype = "bf16"

[[target]]
to = "parquet"
quant = "int8-row"
{extra}
"""


def batch(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "convcore", "batch", *args], capture_output=True,
                          text=True, timeout=timeout)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def outputs(out: Path) -> dict[str, str]:
    """Every output file (not the batch's own state) -> sha256."""
    return {p.relative_to(out).as_posix(): sha256(p) for p in sorted(out.rglob("*"))
            if p.is_file() and p.parent != out}


@pytest.fixture(scope="module")
def src() -> Path:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def first(src: Path, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    work = tmp_path_factory.mktemp("batch")
    (work / "jobs.toml").write_text(jobs_toml(src, "fleet"))
    return work, batch(str(work / "jobs.toml"), "--json", "-q")


def test_one_failure_does_not_stop_the_rest(first):
    work, proc = first
    assert proc.returncode == 1, proc.stderr
    summary = json.loads(proc.stdout)
    status = {r["id"]: r["status"] for r in summary["jobs"]}
    assert status == {**dict.fromkeys(OK_JOBS, "ok"), BAD_JOB: "failed"}
    bad = next(r for r in summary["jobs"] if r["id"] == BAD_JOB)
    assert "cannot store 'q4_k_m'" in bad["error"]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: 1 of 6 jobs failed (first: tiny/mlx-q4_k_m")
    assert "Traceback" not in proc.stderr
    # the summary on disk is the one printed
    assert json.loads((work / "fleet" / SUMMARY_FILE).read_text())["jobs"] == summary["jobs"]
    for row in summary["jobs"]:
        if row["status"] == "ok":
            assert row["size_bytes"] > 0 and row["seconds"] > 0 and row["peak_rss_mb"] > 50
            assert Path(row["path"]).exists()
            assert not get_registry().validate(Path(row["path"]), row["format"])
    checked = {r["id"]: r["check"] for r in summary["jobs"] if r["check"]}
    assert set(checked) == {"tiny/gguf-q8_0", "tiny/gguf-f16"}
    for figures in checked.values():
        assert figures["passed"] and 0 <= figures["kl_mean"] < 0.05 and figures["top1_agreement"] >= 0.8
    # f16 is closer to the source than q8_0
    assert checked["tiny/gguf-f16"]["kl_mean"] < checked["tiny/gguf-q8_0"]["kl_mean"]


def test_registry_matches_schema_and_files(first, src):
    work, _ = first
    path = work / "fleet" / "model_registry.json"
    data = json.loads(path.read_text())
    jsonschema.validate(data, json.loads(model_registry.SCHEMA_PATH.read_text()),
                        cls=jsonschema.Draft202012Validator)
    assert model_registry.problems(data) == []
    (model,) = data["models"]
    assert model["id"] == "tiny" and model["name"] == "Tiny Llama"
    config = json.loads((src / "config.json").read_text())
    assert model["metadata"]["architecture"] == "llama"
    assert model["metadata"]["context_length"] == config["max_position_embeddings"]
    assert model["metadata"]["license"] == "apache-2.0"
    params = get_registry().load(src).num_params
    assert model["metadata"]["parameters"] == params
    assert sorted(f"tiny/{v['id']}" for v in model["variants"]) == sorted(OK_JOBS)
    base = path.parent
    for v in model["variants"]:
        files = [base / f for f in v["files"]]
        assert all(f.is_file() for f in files)
        assert v["size_mb"] == round(sum(f.stat().st_size for f in files) / 1e6, 3)
        target = base / v["file"]
        if target.is_file():
            assert v["sha256"] == sha256(target)
        else:  # sha256sum listing of the folder
            named = sorted((f.relative_to(target).as_posix(), f) for f in files)
            listing = "".join(f"{sha256(f)}  {name}\n" for name, f in named)
            assert v["sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    assert {v["id"]: v["quant"] for v in model["variants"]}["gguf-q8_0"] == "q8_0"
    # the CLI agrees
    listed = subprocess.run([sys.executable, "-m", "convcore", "registry", "validate", str(path)],
                            capture_output=True, text=True)
    assert listed.returncode == 0 and "1 models, 5 variants" in listed.stdout


def test_rerun_skips_finished_jobs(first):
    work, _ = first
    before = {p: os.stat(work / "fleet" / p).st_mtime_ns for p in outputs(work / "fleet")}
    proc = batch(str(work / "jobs.toml"), "--json", "-q")
    assert proc.returncode == 1
    status = {r["id"]: r["status"] for r in json.loads(proc.stdout)["jobs"]}
    assert status == {**dict.fromkeys(OK_JOBS, "skipped"), BAD_JOB: "failed"}
    after = {p: os.stat(work / "fleet" / p).st_mtime_ns for p in outputs(work / "fleet")}
    assert after == before


def test_changed_or_damaged_output_runs_again(first):
    work, _ = first
    fleet = work / "fleet"
    gguf = fleet / "tiny" / "tiny-f16.gguf"
    good = sha256(gguf)
    with open(gguf, "r+b") as f:  # truncated behind our back: no longer counts as done
        f.truncate(gguf.stat().st_size // 2)
    proc = batch(str(work / "jobs.toml"), "--json", "-q")
    status = {r["id"]: r["status"] for r in json.loads(proc.stdout)["jobs"]}
    assert status["tiny/gguf-f16"] == "ok" and status["tiny/gguf-q8_0"] == "skipped"
    assert sha256(gguf) == good


def test_output_not_ours_is_not_replaced(src, tmp_path):
    (tmp_path / "jobs.toml").write_text(jobs_toml(src, "fleet").split("[[target]]")[0]
                                        + '[[target]]\nto = "gguf"\nquant = "q8_0"\n')
    mine = tmp_path / "fleet" / "tiny" / "tiny-q8_0.gguf"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"my own file")
    proc = batch(str(tmp_path / "jobs.toml"), "-q")
    assert proc.returncode == 1
    assert "already exists and was not written by this batch" in proc.stdout
    assert mine.read_bytes() == b"my own file"


@pytest.mark.full
def test_killed_batch_leaves_nothing_counted_as_done(first, src, tmp_path):
    """SIGKILL the batch and its job processes mid-run: whatever is on disk is either a
    complete output or a temporary one; the rerun finishes every job, removes the
    leftovers, and its outputs equal an uninterrupted run's."""
    (tmp_path / "jobs.toml").write_text(jobs_toml(src, "fleet"))
    proc = subprocess.Popen([sys.executable, "-m", "convcore", "batch", str(tmp_path / "jobs.toml"), "-q",
                             "--jobs", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    fleet = tmp_path / "fleet"
    deadline = time.time() + 60
    while time.time() < deadline:  # wait for a job's temporary output, then kill everything
        if list(fleet.glob("tiny/.*.convcore-*")):
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    state = json.loads((fleet / STATE_FILE).read_text())
    unfinished = [j for j, e in state["jobs"].items() if e["status"] == "running"]
    assert unfinished, "the kill came after the batch had finished"
    registered = set()
    if (fleet / "model_registry.json").exists():
        data = model_registry.read(fleet / "model_registry.json")
        registered = {f"{m['id']}/{v['id']}" for m, v in model_registry.variants(data)}
    assert not registered & set(unfinished)
    again = batch(str(tmp_path / "jobs.toml"), "--json", "-q")
    status = {r["id"]: r["status"] for r in json.loads(again.stdout)["jobs"]}
    assert all(status[j] in ("ok", "skipped") for j in OK_JOBS), status
    assert not list(fleet.rglob(".*.convcore-*"))
    # the same bytes as the run that was never interrupted (the first fixture's)
    assert outputs(fleet) == outputs(first[0] / "fleet")


def test_memory_budget_runs_jobs_one_at_a_time(src, tmp_path):
    """-X memory below two jobs' estimates: the local executor never overlaps them."""
    (tmp_path / "jobs.toml").write_text(jobs_toml(src, "fleet").split("[[target]]")[0]
                                        + '[[target]]\nto = "gguf"\nquant = ["q8_0", "f16", "bf16"]\n')
    proc = batch(str(tmp_path / "jobs.toml"), "--json", "-q", "--jobs", "3", "-X", "memory=500M")
    assert proc.returncode == 0, proc.stderr
    rows = sorted(json.loads(proc.stdout)["jobs"], key=lambda r: r["started_at"])
    assert all(r["memory_estimate_mb"] > 250 for r in rows)
    for a, b in zip(rows, rows[1:]):
        assert a["finished_at"] <= b["started_at"] + 0.05


@pytest.mark.parametrize("text, message", [
    ("[batch]\nout = 1\n[[model", "not valid TOML"),
    ("[[model]]\nid = 'a'\nsource = 'x'\n[[target]]\nto = 'gguf'\nquantt = 'q8_0'\n", "unknown key 'quantt'"),
    ("[[model]]\nid = '../a'\nsource = 'x'\n[[target]]\nto = 'gguf'\n", "must be a plain name"),
    ("[[model]]\nid = 'a'\nsource = 'x'\n", "no [[target]] tables"),
    ("[[model]]\nid = 'a'\nsource = 'x'\n[[target]]\nto = 'gguf'\nmodels = ['b']\n", "unknown model 'b'"),
    ("[[model]]\nid = 'a'\nsource = 'x'\n[[target]]\nto = 'gguf'\ncheck = { kl = -1 }\n",
     "check.kl must be a positive number"),
])
def test_bad_jobs_file_is_one_line(tmp_path, text, message):
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(text)
    proc = batch(str(jobs))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {jobs}") and message in lines[0], proc.stderr
    assert not (tmp_path / "jobs-out").exists()


def test_missing_source_fails_its_jobs_only(src, tmp_path):
    text = jobs_toml(src, "fleet").split("[[target]]")[0] + \
        '[[model]]\nid = "gone"\nsource = "nowhere"\n[[target]]\nto = "gguf"\nquant = "q8_0"\n'
    (tmp_path / "jobs.toml").write_text(text)
    proc = batch(str(tmp_path / "jobs.toml"), "--json", "-q")
    status = {r["id"]: (r["status"], r["error"]) for r in json.loads(proc.stdout)["jobs"]}
    assert status["tiny/gguf-q8_0"][0] == "ok"
    assert status["gone/gguf-q8_0"][0] == "failed" and "nowhere" in status["gone/gguf-q8_0"][1]


def test_registry_add_list_show(first, tmp_path):
    work, _ = first
    registry = work / "fleet" / "model_registry.json"
    copy = work / "fleet" / "extra" / "hand.gguf"
    copy.parent.mkdir(exist_ok=True)
    copy.write_bytes((work / "fleet" / "tiny" / "tiny-q8_0.gguf").read_bytes())
    run = [sys.executable, "-m", "convcore", "registry"]
    added = subprocess.run(run + ["add", str(registry), str(copy), "--model", "hand", "--quant", "q8_0",
                                  "--license", "mit"], capture_output=True, text=True)
    assert added.returncode == 0, added.stderr
    shown = json.loads(subprocess.run(run + ["show", str(registry), "hand/gguf-q8_0"],
                                      capture_output=True, text=True).stdout)
    assert shown["file"] == "extra/hand.gguf" and shown["sha256"] == sha256(copy)
    listed = subprocess.run(run + ["list", str(registry)], capture_output=True, text=True).stdout
    assert "hand/gguf-q8_0" in listed and "tiny/gguf-f16" in listed
    outside = tmp_path / "x.gguf"
    outside.write_bytes(copy.read_bytes())
    refused = subprocess.run(run + ["add", str(registry), str(outside), "--model", "x"],
                             capture_output=True, text=True)
    assert refused.returncode == 1 and "outside the registry's folder" in refused.stderr
    missing = subprocess.run(run + ["show", str(registry), "nope"], capture_output=True, text=True)
    assert missing.returncode == 1 and "no model 'nope'" in missing.stderr
    model_registry.read(registry)  # still valid


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["models"][0]["variants"][0].update(file="../../etc/passwd"), "variants[0].file"),
    (lambda d: d["models"][0]["variants"][0].update(sha256="abc"), "sha256"),
    (lambda d: d.update(schema_version=9), "schema_version"),
    (lambda d: d["models"].append(dict(d["models"][0])), "appears twice"),
])
def test_broken_registry_is_refused(first, tmp_path, edit, message):
    work, _ = first
    data = json.loads((work / "fleet" / "model_registry.json").read_text())
    edit(data)
    bad = tmp_path / "model_registry.json"
    bad.write_text(json.dumps(data))
    proc = subprocess.run([sys.executable, "-m", "convcore", "registry", "list", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: {bad}: not a valid model registry") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_model_imatrix_goes_to_the_targets_that_take_one(tmp_path):
    """A [[model]]'s `imatrix` (relative to the jobs file) reaches its gguf jobs as the
    writer's imatrix option, and not formats without one; a target's own option wins."""
    from convcore_fleet.jobs import read_plan

    (tmp_path / "jobs.toml").write_text(
        '[[model]]\nid = "a"\nsource = "m"\nimatrix = "m.imatrix.gguf"\n'
        '[[model]]\nid = "b"\nsource = "m"\n'
        '[[target]]\nto = "gguf"\nquant = ["q4_k_m", "q8_0"]\n'
        '[[target]]\nto = "gguf"\nquant = "iq4_xs"\nmodels = ["a"]\noptions = { imatrix = "own.gguf" }\n'
        '[[target]]\nto = "mlx"\nquant = "int4-g64"\n')
    plan = read_plan(tmp_path / "jobs.toml", get_registry())
    options = {j.id: j.options for j in plan.jobs}
    assert options["a/gguf-q4_k_m"] == options["a/gguf-q8_0"] == {"imatrix": str(tmp_path / "m.imatrix.gguf")}
    assert options["a/gguf-iq4_xs"] == {"imatrix": "own.gguf"}
    assert options["b/gguf-q4_k_m"] == {} and options["a/mlx-int4-g64"] == {}
