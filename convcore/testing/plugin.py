"""pytest fixtures for convcore and plugin test suites."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

from .models import tiny_model


@pytest.fixture(scope="session")
def tiny_model_factory() -> Callable[..., Path]:
    """``factory(arch="llama", **kwargs) -> Path``: a tiny HF model dir, cached across
    runs. Treat it as read-only; copy it before changing anything."""
    return tiny_model


@pytest.fixture(scope="session")
def tiny_llama() -> Path:
    """A tiny f32 llama HF dir (hidden 256, 2 layers, GQA 4/2, SentencePiece vocab 1024)."""
    return tiny_model("llama")


@pytest.fixture
def run_cli() -> Callable[..., Any]:
    """Run ``convcore`` in a child process: ``run_cli("run", src, "-o", dst, ...)`` returns
    the CompletedProcess (text mode, stdout/stderr captured)."""
    import subprocess
    import sys

    def run(*args: Any, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
        import os
        full_env = dict(os.environ)
        full_env.update(env or {})
        return subprocess.run([sys.executable, "-m", "convcore", *map(str, args)],
                              capture_output=True, text=True, env=full_env, check=check)

    return run
