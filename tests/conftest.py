"""Shared fixtures for the core tests: real plugin distributions installed by pip."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from convcore.testing.distributions import pip_install, write_plugin

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PLUGIN = ROOT / "docs" / "example-plugin"


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """A site dir with two pip-installed plugins: the example ``npydir`` plugin and one
    that raises on import (``duplicate_site`` holds one registering ``npydir`` again)."""
    site = tmp_path_factory.mktemp("site")
    src = tmp_path_factory.mktemp("plugin-src")
    pip_install(EXAMPLE_PLUGIN, site)
    pip_install(write_plugin(src, "convcore-broken", "convcore_broken", "broken",
                             "raise RuntimeError('this plugin is broken on purpose')\n"), site)
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


@pytest.fixture
def src(tiny_llama, tmp_path):
    """A private copy of the tiny llama at ``tmp_path/src``, which a test may break (and
    whose tree digest shows whether a conversion touched it)."""
    path = tmp_path / "src"
    shutil.copytree(tiny_llama, path)
    return path
