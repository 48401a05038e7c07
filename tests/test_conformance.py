"""The conformance suite, run on every installed writable format."""
from __future__ import annotations

import pytest

import convcore
from convcore.testing.conformance import check_format

# Formats with a lossless f32 path and the options that select it.
LOSSLESS = {"hf": {}, "gguf": {"quant": "f32"}, "mlx": {"dtype": "f32"}, "onnx": {"dtype": "f32"}}
LOSSY = {"npz": {"quant": "int8-row"}}


@pytest.mark.parametrize("fmt", sorted(LOSSLESS) + sorted(LOSSY))
def test_format_conformance(fmt, tiny_llama, tmp_path):
    if fmt not in convcore.get_registry().formats:
        pytest.skip(f"format {fmt} is not installed")
    kwargs = LOSSLESS.get(fmt, LOSSY.get(fmt))
    check_format(fmt, tiny_llama, tmp_path, lossless=fmt in LOSSLESS, **kwargs)


def test_conformance_catches_a_lossy_writer(tiny_llama, tmp_path):
    """The suite itself fails on a format that loses bits while claiming lossless."""
    with pytest.raises(AssertionError):
        check_format("hf", tiny_llama, tmp_path, dtype="bf16")
