"""Real plugin distributions for tests: write one, pip-install it into a site directory.

A test that puts the site directory on a child ``convcore``'s ``PYTHONPATH`` sees the
plugin exactly as a user who ran ``pip install`` would (wheel built, dist-info and
entry points written), and the venv is never touched.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable


def pip_install(package_dir: Path, target: Path) -> None:
    """``pip install`` the distribution at ``package_dir`` into ``target``.

    The build runs on a copy in a temporary directory: setuptools writes ``build/`` and
    ``*.egg-info`` beside the sources, and ``package_dir`` may be in the repository.
    """
    package_dir = Path(package_dir)
    with tempfile.TemporaryDirectory(prefix="convcore-build-") as tmp:
        copy = Path(tmp) / package_dir.name
        shutil.copytree(package_dir, copy,
                        ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__"))
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
             "--no-index", "--target", str(target), str(copy)],
            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pip install {package_dir} failed:\n{result.stderr.strip()}")


def write_plugin(root: Path, dist: str, module: str, ep_name: str, body: str,
                 version: str = "1.0", dependencies: Iterable[str] = ()) -> Path:
    """Write a one-module plugin distribution under ``root/dist``: a pyproject.toml with
    the ``convcore`` entry point ``ep_name = module`` and ``module/__init__.py`` = ``body``.
    Returns the distribution's directory, ready for :func:`pip_install`."""
    pkg = Path(root) / dist
    (pkg / module).mkdir(parents=True)
    deps = ", ".join(f'"{d}"' for d in dependencies)
    (pkg / "pyproject.toml").write_text(f"""
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"
[project]
name = "{dist}"
version = "{version}"
dependencies = [{deps}]
[project.entry-points.convcore]
{ep_name} = "{module}"
""")
    (pkg / module / "__init__.py").write_text(body)
    return pkg
