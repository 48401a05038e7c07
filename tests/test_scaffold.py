"""``convcore new-plugin``: the scaffold is a real distribution that pip installs, that
convcore discovers and converts with, and whose own tests pass."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib

import pytest

from convcore.safetensors_io import open_tensors
from convcore.scaffold import create_plugin
from convcore.testing.distributions import pip_install


def clean_env(site) -> dict:
    """The environment for a child that sees the plugins in ``site`` (and keeps the cache
    of tiny models, CONVCORE_CACHE)."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_PLUGINS")}
    env["PYTHONPATH"] = str(site)
    return env


def assert_one_error_line(result) -> None:
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr


@pytest.mark.slow
def test_scaffold_installs_converts_and_passes_its_own_tests(run_cli, tiny_llama, tmp_path):
    scaffold, site = tmp_path / "src" / "convcore-myfmt", tmp_path / "site"
    r = run_cli("new-plugin", "myfmt", "--dir", scaffold)
    assert r.returncode == 0, r.stderr
    assert (scaffold / "convcore_myfmt" / "__init__.py").is_file()
    pip_install(scaffold, site)
    env = clean_env(site)

    r = run_cli("plugins", "--json", env=env)
    assert r.returncode == 0, r.stderr
    row = {p["name"]: p for p in json.loads(r.stdout)}["myfmt"]
    assert (row["version"], row["formats"], row["error"]) == ("0.1.0", ["myfmt"], "")
    assert row["hooks"] == ["convcore_load", "convcore_register_formats",
                            "convcore_validate", "convcore_write"]
    r = run_cli("formats", "myfmt", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert [o["name"] for o in json.loads(r.stdout)["options"]] == ["compress"]

    out, back = tmp_path / "out", tmp_path / "back"
    r = run_cli("run", tiny_llama, "-o", out, "--to", "myfmt", env=env)
    assert r.returncode == 0, r.stderr
    assert (out / "myfmt.json").is_file() and list(out.glob("tensor-*.npy"))
    r = run_cli("validate", out, env=env)  # format detected
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_cli("run", out, "-o", back, "--to", "hf", env=env)
    assert r.returncode == 0, r.stderr
    want, _ = open_tensors(tiny_llama / "model.safetensors")
    got, _ = open_tensors(back / "model.safetensors")
    assert list(got) == list(want)
    for name, ref in want.items():
        a, b = ref.load(), got[name].load()
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name
    for file in ("tokenizer.model", "tokenizer_config.json"):
        assert (back / file).read_bytes() == (tiny_llama / file).read_bytes(), file

    # the declared option reaches the writer; damage is caught by its validator
    zipped = tmp_path / "zipped"
    r = run_cli("run", tiny_llama, "-o", zipped, "--to", "myfmt", "-O", "compress=true", env=env)
    assert r.returncode == 0, r.stderr
    assert list(zipped.glob("tensor-*.npz")) and not list(zipped.glob("tensor-*.npy"))
    victim = sorted(out.glob("tensor-*.npy"))[-1]
    victim.write_bytes(victim.read_bytes()[:-8])
    r = run_cli("validate", out, env=env)
    assert r.returncode != 0 and victim.name in r.stdout + r.stderr

    # the scaffold's own tests, against the installed copy (cwd outside the scaffold)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(scaffold / "tests")], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    passed = re.search(r"(\d+) passed", r.stdout)
    assert passed and int(passed.group(1)) >= 6 and "skipped" not in r.stdout, r.stdout[-2000:]


@pytest.mark.parametrize("name", ["MyFmt", "my-fmt", "1fmt", "my fmt", "x" * 41, "hf"])
def test_bad_name_is_one_error_line(run_cli, tmp_path, name):
    r = run_cli("new-plugin", name, "--dir", tmp_path / "plugin")
    assert_one_error_line(r)
    assert repr(name) in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_non_empty_directory_is_refused_and_left_alone(run_cli, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    r = run_cli("new-plugin", "myfmt", "--dir", tmp_path)
    assert_one_error_line(r)
    assert "not empty" in r.stderr and str(tmp_path) in r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_scaffold_fills_an_empty_directory_with_the_distribution(tmp_path):
    target = tmp_path / "plugin"
    target.mkdir()
    assert create_plugin("myfmt", target) == target
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert files == ["README.md", "convcore_myfmt/__init__.py", "pyproject.toml",
                     "tests/test_myfmt.py"]
    project = tomllib.loads((target / "pyproject.toml").read_text())["project"]
    assert project["name"] == "convcore-myfmt"
    assert project["dependencies"] == ["convcore", "numpy"]
    assert project["entry-points"]["convcore"] == {"myfmt": "convcore_myfmt"}
    assert "pytest" in project["optional-dependencies"]["test"]
    for file in files:
        text = (target / file).read_text()
        assert "{{" not in text, file
        if file.endswith(".py"):
            compile(text, file, "exec")
    module = (target / "convcore_myfmt" / "__init__.py").read_text()
    imports = re.findall(r"^\s*(?:from|import) (\w+)", module, re.MULTILINE)
    assert set(imports) <= {"__future__", "json", "zipfile", "pathlib", "numpy", "convcore"}
