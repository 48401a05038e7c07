"""Hub ids as sources, fetched by huggingface_hub itself from a local server that speaks
the hub's API (HF_ENDPOINT), into a cache of its own (HF_HUB_CACHE)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from convcore.testing.hubserver import HubServer, Repo
from convcore.testing.models import tiny_model

pytest.importorskip("huggingface_hub")

#: in the repository beside the model, and never needed to convert it
EXTRAS = {"pytorch_model.bin": b"not needed: safetensors are there", "consolidated.safetensors": b"x",
          "onnx/model.onnx": b"x", "original/params.json": b"{}", "weights.gguf": b"x"}


CUT = 12 << 20


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    folder = tmp_path / "repo"
    # weights over huggingface_hub's 10 MB read size, so a transfer can break off midway
    shutil.copytree(tiny_model("llama", hidden=512, ffn=2048), folder)
    for name, data in EXTRAS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    return folder


def hub_env(tmp_path: Path, url: str | None = None, offline: bool = False) -> dict:
    env = {"HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_ENABLE_HF_TRANSFER": "0", "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": ""}
    env["HF_ENDPOINT"] = url or "http://127.0.0.1:9"   # offline runs must not need it
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def test_hub_id_downloads_what_is_needed_then_converts_offline(repo: Path, tmp_path: Path, run_cli) -> None:
    with HubServer({"org/tiny": Repo(repo)}, cut={"model.safetensors": CUT}) as hub:
        env = hub_env(tmp_path, hub.url)
        r = run_cli("run", "org/tiny", "--to", "gguf", "-o", tmp_path / "a.gguf", "-q", env=env)
        assert r.returncode == 0, r.stderr
        got = hub.downloaded()
        # the broken-off transfer was resumed where it stopped, not started over
        resumed = [int(rng[6:-1]) for m, p, rng in hub.requests
                   if m == "GET" and p.endswith("/model.safetensors") and rng.startswith("bytes=")]
        # the broken-off transfer went on from the whole reads it had (10 MB), not from 0
        assert len(resumed) == 1 and 0 < resumed[0] <= CUT
    assert "model.safetensors" in got and "config.json" in got and "tokenizer.json" in got
    assert "README.md" in got
    assert not set(got) & set(EXTRAS)
    snapshots = list((tmp_path / "hf-cache" / "models--org--tiny" / "snapshots").iterdir())
    assert len(snapshots) == 1
    # the same file as converting the snapshot folder (named after the repository)
    r = run_cli("run", snapshots[0], "--to", "gguf", "-o", tmp_path / "b.gguf", "-q",
                "--metadata", "name=tiny", env=hub_env(tmp_path))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    # offline, from the cache alone: the same file again; an uncached id is one line
    offline = hub_env(tmp_path, offline=True)
    r = run_cli("run", "org/tiny", "--to", "gguf", "-o", tmp_path / "c.gguf", "-q", env=offline)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "c.gguf").read_bytes() == (tmp_path / "a.gguf").read_bytes()
    r = run_cli("inspect", "org/other", env=offline)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "org/other: not in the local hub cache and HF_HUB_OFFLINE is set" in r.stderr


def test_revisions_gated_and_missing_repositories(repo: Path, tmp_path: Path, run_cli) -> None:
    commit = Repo(repo).commit
    with HubServer({"org/tiny": Repo(repo), "org/gated": Repo(repo, gated=True)}) as hub:
        env = hub_env(tmp_path, hub.url)
        r = run_cli("inspect", f"org/tiny@{commit}", env=env)
        assert r.returncode == 0 and f"snapshots/{commit}" in r.stdout, r.stderr
        for spec, expect in (("org/tiny@v9", "org/tiny@v9: the repository has no revision 'v9'"),
                             ("org/gated", "org/gated: a gated repository"),
                             ("org/missing", "org/missing: no such model on the hub")):
            r = run_cli("inspect", spec, env=env)
            assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
            assert expect in r.stderr and "Traceback" not in r.stderr


def test_a_local_folder_of_that_name_wins(repo: Path, tmp_path: Path, run_cli) -> None:
    (tmp_path / "org").mkdir()
    shutil.copytree(repo, tmp_path / "org" / "tiny")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        r = run_cli("inspect", "org/tiny", env=hub_env(tmp_path, offline=True))
    finally:
        os.chdir(cwd)
    assert r.returncode == 0, r.stderr
    assert "note: org/tiny: the local path is used, not the hub id of that name" in r.stderr


def test_fake_of_a_hub_id_fetches_no_weights(repo: Path, tmp_path: Path, run_cli) -> None:
    import convcore

    with HubServer({"org/tiny": Repo(repo)}) as hub:
        r = run_cli("fake", "org/tiny", "-o", tmp_path / "fake", "-q", env=hub_env(tmp_path, hub.url))
        assert r.returncode == 0, r.stderr
        got = hub.downloaded()
    assert "config.json" in got and "tokenizer.json" in got
    assert not [f for f in got if f.endswith((".safetensors", ".bin"))]
    fake, real = convcore.load(tmp_path / "fake"), convcore.load(repo)
    assert {n: t.shape for n, t in fake.tensors.items()} == {n: t.shape for n, t in real.tensors.items()}
