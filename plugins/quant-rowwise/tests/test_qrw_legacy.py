"""q8_0 q4_0 q4_1 q5_0 q5_1: bytes identical to gguf-py's port of ggml's reference."""
from __future__ import annotations

import gguf
import ml_dtypes
import numpy as np
import pytest

import convcore

KINDS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
SHAPES = [(1, 32), (4, 64), (3, 5, 128), (64, 4096)]
DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]


def sample(shape, dtype, seed):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.05
    flat = x.reshape(-1)
    flat[:32] = 0.0                      # an all-zero block
    if flat.size >= 96:
        flat[32:64] = 0.25               # a constant block
        flat[64:96] *= 1000              # a block of large values
        flat[70] = -flat[64:96].__abs__().max()  # negative extreme (sign of the q4_0 scale)
    if flat.size >= 160:
        flat[96:128] *= 1e-5                 # f16 scales that are subnormal
        if np.dtype(dtype) != np.float16:    # (f16 input cannot hold such values)
            flat[128:160] *= 1e8             # f16 scales that overflow to inf
    return x.astype(dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_bytes_identical_to_gguf_py(kind, shape, dtype):
    x = sample(shape, dtype, seed=hash((kind, shape)) % 1000)
    ours = convcore.quantize(x, kind)
    theirs = gguf.quants.quantize(x.astype(np.float32), gguf.GGMLQuantizationType[kind.upper()])
    assert ours.data["blocks"].dtype == np.uint8
    assert ours.data["blocks"].shape == theirs.shape
    assert np.array_equal(ours.data["blocks"], theirs)
    deq = ours.dequantize()
    ref = gguf.quants.dequantize(theirs, gguf.GGMLQuantizationType[kind.upper()])
    np.testing.assert_array_equal(deq, ref.reshape(shape))


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_is_refused(kind):
    x = np.ones((2, 64), np.float32)
    x[1, 5] = np.nan
    with pytest.raises(convcore.ConvcoreError, match="NaN or Inf"):
        convcore.quantize(x, kind, {"name": "blk.0.w"})
    x[1, 5] = np.inf
    with pytest.raises(convcore.ConvcoreError, match="'blk.0.w'.*NaN or Inf"):
        convcore.quantize(x, kind, {"name": "blk.0.w"})
    with pytest.raises(convcore.ConvcoreError, match="row length 48 is not a multiple"):
        convcore.quantize(np.ones((2, 48), np.float32), kind)
