"""Shared fixtures for the core tests: real plugin distributions installed by pip."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PLUGIN = ROOT / "docs" / "example-plugin"


def pip_install(package_dir: Path, target: Path) -> None:
    """``pip install`` a plugin distribution into ``target`` (a real install: wheel
    built, dist-info and entry points written), without touching the venv."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(package_dir)],
        check=True, capture_output=True, text=True)


def write_plugin(root: Path, dist: str, module: str, ep_name: str, body: str, version="1.0") -> Path:
    pkg = root / dist
    (pkg / module).mkdir(parents=True)
    (pkg / "pyproject.toml").write_text(f"""
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"
[project]
name = "{dist}"
version = "{version}"
[project.entry-points.convcore]
{ep_name} = "{module}"
""")
    (pkg / module / "__init__.py").write_text(body)
    return pkg


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """A site dir with three pip-installed plugins: the example ``npydir`` plugin, one
    that raises on import, and one that registers ``npydir`` a second time."""
    site = tmp_path_factory.mktemp("site")
    src = tmp_path_factory.mktemp("plugin-src")
    pip_install(EXAMPLE_PLUGIN, site)
    pip_install(write_plugin(src, "convcore-broken", "convcore_broken", "broken",
                             "raise RuntimeError('this plugin is broken on purpose')\n"), site)
    shutil.rmtree(ROOT / "docs" / "example-plugin" / "build", ignore_errors=True)
    return site


@pytest.fixture(scope="session")
def duplicate_site(tmp_path_factory, plugin_site) -> Path:
    site = tmp_path_factory.mktemp("site-dup")
    src = tmp_path_factory.mktemp("plugin-src-dup")
    body = ("import convcore\n"
            "@convcore.hookimpl\n"
            "def convcore_register_formats(register):\n"
            "    register(convcore.Format(name='npydir'))\n")
    pip_install(write_plugin(src, "convcore-dup", "convcore_dup", "dup", body), site)
    return site


@pytest.fixture
def plugin_env(plugin_site):
    """Environment for a child ``convcore`` that sees the installed plugins."""
    def make(*sites: Path, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVCORE_")}
        env["PYTHONPATH"] = os.pathsep.join(str(s) for s in (plugin_site, *sites))
        env.update(extra)
        return env
    return make
