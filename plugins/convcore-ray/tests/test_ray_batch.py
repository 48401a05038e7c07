"""The ``ray`` executor on a real Ray cluster: `ray start --head` (2 CPUs, its own temp
dir), then the same jobs file as the local executor, joined by address. The outputs
must be byte-identical, the failing job must fail alone, and the registry must list the
same variants with the same hashes."""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from convcore.testing.models import tiny_model

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

JOBS = """
[batch]
out = "{out}"

[[model]]
id = "tiny"
source = "{src}"
license = "apache-2.0"

[[target]]
to = "gguf"
quant = ["q8_0", "f16"]

[[target]]
to = "mlx"
quant = ["int4-g64", "q4_k_m"]

[[target]]
to = "hf"
dtype = "bf16"

[[target]]
to = "parquet"
quant = "int8-row"
check = {{ kl = 0.05, tokens = 64 }}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli() -> str:
    found = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if not found:
        pytest.skip("the ray command is not installed")
    return found


# Ray's token authentication (its default since 2.5x): the cluster and the driver share a
# token through the environment, so nothing is written to ~/.ray
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


@pytest.fixture(scope="module")
def cluster():
    """A one-node Ray cluster with 2 CPUs, stopped afterwards."""
    ray = ray_cli()
    port = free_port()
    temp = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray's socket paths are limited
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", **AUTH)
    started = subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=2",
                              f"--temp-dir={temp}", "--include-dashboard=false", "--disable-usage-stats"],
                             capture_output=True, text=True, env=env, timeout=120)
    if started.returncode:
        pytest.fail(f"ray start failed: {started.stderr[-2000:]}")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120, env=env)
        shutil.rmtree(temp, ignore_errors=True)


def run_batch(jobs: Path, *extra: str) -> tuple[int, dict]:
    # a cluster started with token authentication (Ray's default) is joined by address
    # only when the driver is told so, as Ray's docs say
    env = dict(os.environ, **AUTH)
    proc = subprocess.run([sys.executable, "-m", "convcore", "batch", str(jobs), "--json", "-q", *extra],
                          capture_output=True, text=True, timeout=600, env=env)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout, f"rc {proc.returncode}, no report; stderr: {proc.stderr[-3000:]}"
    return proc.returncode, json.loads(proc.stdout)


def tree(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.parent != out}


def test_ray_executor_matches_local(cluster, tmp_path):
    src = tiny_model("llama")
    (tmp_path / "local.toml").write_text(JOBS.format(out="local", src=src))
    (tmp_path / "ray.toml").write_text(JOBS.format(out="ray", src=src))
    rc_local, local = run_batch(tmp_path / "local.toml")
    rc_ray, on_ray = run_batch(tmp_path / "ray.toml", "--executor", "ray", "-X", f"address={cluster}")
    assert rc_local == rc_ray == 1  # the mlx q4_k_m job fails on both
    assert on_ray["executor"] == "ray"
    status = {r["id"]: r["status"] for r in on_ray["jobs"]}
    assert status == {r["id"]: r["status"] for r in local["jobs"]}
    assert status["tiny/mlx-q4_k_m"] == "failed" and sum(s == "ok" for s in status.values()) == 5
    assert tree(tmp_path / "ray") == tree(tmp_path / "local")
    assert len(tree(tmp_path / "ray")) > 10
    ray_check = next(r["check"] for r in on_ray["jobs"] if r["id"] == "tiny/parquet-int8-row")
    local_check = next(r["check"] for r in local["jobs"] if r["id"] == "tiny/parquet-int8-row")
    assert ray_check["passed"] and ray_check["kl_mean"] == pytest.approx(local_check["kl_mean"], rel=1e-6)
    reg = {name: json.loads((tmp_path / name / "model_registry.json").read_text()) for name in ("local", "ray")}
    hashes = {name: {v["id"]: v["sha256"] for v in data["models"][0]["variants"]} for name, data in reg.items()}
    assert hashes["ray"] == hashes["local"] and len(hashes["ray"]) == 5
    # a rerun on the cluster skips what it finished
    rc_again, again = run_batch(tmp_path / "ray.toml", "--executor", "ray", "-X", f"address={cluster}")
    assert {r["id"]: r["status"] for r in again["jobs"] if r["status"] != "failed"} == \
        {r["id"]: "skipped" for r in on_ray["jobs"] if r["status"] == "ok"}


def test_unreachable_cluster_is_one_line(tmp_path):
    ray_cli()
    src = tiny_model("llama")
    (tmp_path / "jobs.toml").write_text(JOBS.format(out="out", src=src))
    proc = subprocess.run([sys.executable, "-m", "convcore", "batch", str(tmp_path / "jobs.toml"), "-q",
                           "--executor", "ray", "-X", f"address=127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ray: cannot reach the cluster")
    assert "Traceback" not in proc.stderr
