"""Plugin discovery with real pip-installed distributions, run in child processes."""
from __future__ import annotations

import json

import numpy as np
import pytest

import convcore
from convcore.safetensors_io import open_tensors


def plugins_json(run_cli, env, *args):
    result = run_cli("plugins", "--json", *args, env=env)
    assert result.returncode == 0, result.stderr
    return {p["name"]: p for p in json.loads(result.stdout)}


def test_installed_plugin_is_listed_with_version_hooks_formats(run_cli, plugin_env):
    rows = plugins_json(run_cli, plugin_env())
    row = rows["npydir"]
    assert row["version"] == "0.3.1"
    assert row["formats"] == ["npydir"]
    assert row["hooks"] == ["convcore_load", "convcore_register_formats",
                            "convcore_validate", "convcore_write"]
    assert row["error"] == ""
    assert "convcore.builtins.hf" not in rows  # built-ins hidden without --all
    assert "convcore.builtins.hf" in plugins_json(run_cli, plugin_env(), "--all")


def test_broken_plugin_is_reported_and_others_keep_working(run_cli, plugin_env):
    rows = plugins_json(run_cli, plugin_env())
    assert rows["broken"]["error"] == "RuntimeError: this plugin is broken on purpose"
    formats = run_cli("formats", "--json", env=plugin_env())
    assert formats.returncode == 0, formats.stderr
    assert {"hf", "npydir"} <= {f["format"] for f in json.loads(formats.stdout)}


def test_disable_plugins_hides_a_plugin(run_cli, plugin_env):
    rows = plugins_json(run_cli, plugin_env(CONVCORE_DISABLE_PLUGINS="npydir,broken"))
    assert "npydir" not in rows and "broken" not in rows
    formats = json.loads(run_cli("formats", "--json",
                                 env=plugin_env(CONVCORE_DISABLE_PLUGINS="npydir")).stdout)
    assert "npydir" not in {f["format"] for f in formats}


def test_load_plugins_allow_list(run_cli, plugin_env):
    assert plugins_json(run_cli, plugin_env(CONVCORE_LOAD_PLUGINS="")) == {}
    assert set(plugins_json(run_cli, plugin_env(CONVCORE_LOAD_PLUGINS="npydir"))) == {"npydir"}


def test_duplicate_format_is_an_error_naming_both(run_cli, plugin_env, duplicate_site):
    result = run_cli("formats", env=plugin_env(duplicate_site))
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1
    assert "'npydir'" in result.stderr and "'dup'" in result.stderr


def test_third_party_format_round_trips_through_the_cli(run_cli, plugin_env, tiny_llama, tmp_path):
    env = plugin_env()
    mid, back = tmp_path / "npy", tmp_path / "back"
    r = run_cli("run", tiny_llama, "-o", mid, "--to", "npydir", "--dtype", "bf16", env=env)
    assert r.returncode == 0, r.stderr
    r = run_cli("run", mid, "-o", back, "--to", "hf", env=env)  # --from detected
    assert r.returncode == 0, r.stderr
    src, _ = open_tensors(tiny_llama / "model.safetensors")
    out, _ = open_tensors(back / "model.safetensors")
    assert list(src) == list(out)
    for name, ref in src.items():
        want = convcore.cast(ref.load(), "bf16")
        got = out[name].load()
        assert got.dtype == want.dtype and np.array_equal(got.view(np.uint16), want.view(np.uint16))


def test_the_core_names_no_plugin():
    """The core knows plugins only through what they register: no file under convcore/
    names a plugin distribution or its module (hints come from installed data)."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    names = set()
    for project in root.glob("plugins/*/pyproject.toml"):
        meta = tomllib.loads(project.read_text())["project"]
        names.add(meta["name"])
        names.update(meta.get("entry-points", {}).get("convcore", {}).values())
    assert {"conv-gguf", "quant-rowwise", "conv_gguf"} <= names
    offenders = [f"{path.relative_to(root)}: {name}"
                 for path in sorted((root / "convcore").rglob("*"))
                 if path.is_file() and path.suffix in (".py", ".tmpl", ".txt", ".md")
                 for name in sorted(names) if name in path.read_text(errors="replace")]
    assert offenders == []


@pytest.mark.full
def test_warmup_fills_the_kernel_cache_and_names_unknown_schemes(run_cli, tmp_path):
    """``convcore warmup`` compiles the named schemes' kernels into the on-disk cache
    (here an empty one) in worker processes; an unknown name is a one-line error."""
    env = {"CONVCORE_CACHE": str(tmp_path)}
    env.pop("NUMBA_CACHE_DIR", None)
    r = run_cli("warmup", "q8_0", "int4-row", "--jobs", "2", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("2 of 2 schemes ready in ")
    cached = list((tmp_path / "numba").glob("quant_rowwise-*/*.nbc"))
    assert any("legacy" in p.name for p in cached) and any("rows" in p.name for p in cached)
    r = run_cli("warmup", "q9_9", env=env)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: unknown quantization scheme 'q9_9': no installed plugin")
