"""Fixtures for the conv-parquet suite: the registry with the V2 schemes, and helpers
that read what a test wrote."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

import convcore
from conv_parquet import SCHEMES

sys.path.insert(0, str(Path(__file__).parent))  # for parquet_helpers (importlib import mode)


@pytest.fixture(scope="session")
def registry() -> convcore.Registry:
    """The process registry, with every scheme the parquet format lists installed."""
    registry = convcore.get_registry()
    missing = [s for s in SCHEMES if s not in registry.schemes]
    if missing:
        pytest.fail(f"quant-rowwise is not installed (missing schemes {missing[:3]}...)")
    return registry
