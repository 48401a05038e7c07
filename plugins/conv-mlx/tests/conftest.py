"""Fixtures for the conv-mlx suite.

The affine ``int{B}-g{G}`` schemes come from the quant-rowwise plugin; the byte
comparisons with ``mlx_lm.convert`` check its kernels as well as this plugin's layout.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

import convcore

sys.path.insert(0, str(Path(__file__).parent))  # for mlx_helpers (importlib import mode)
from mlx_helpers import NAMES  # noqa: E402


@pytest.fixture(scope="session")
def affine_registry() -> convcore.Registry:
    """A registry with the mlx format and all 18 affine schemes."""
    registry = convcore.get_registry()
    missing = [n for n in NAMES if n not in registry.schemes]
    if missing:
        pytest.fail(f"quant-rowwise is not installed (missing schemes {missing[:3]}...)")
    return registry
