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


def order_sensitive_blocks() -> np.ndarray:
    """Blocks whose scale depends on which value is met first: ties for the largest
    magnitude (either sign first), zeros of both signs, all-zero blocks of either sign."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((12, 32)).astype(np.float32)
    top = np.abs(x).max(axis=1)
    x[0, 3], x[0, 20] = top[0] * 2, -top[0] * 2     # tie, positive first
    x[1, 3], x[1, 20] = -top[1] * 2, top[1] * 2     # tie, negative first
    x[2] = 0.0
    x[3] = -0.0
    x[4] = 0.0
    x[4, 1::2] = -0.0                               # +0 first
    x[5] = -0.0
    x[5, 1::2] = 0.0                                # -0 first
    x[6] = np.abs(x[6])
    x[6, 9] = 0.0                                   # min a zero, then a -0
    x[6, 17] = -0.0
    x[7] = -np.abs(x[7])
    x[7, 4] = -0.0                                  # max a zero, -0 first
    x[7, 11] = 0.0
    x[8, ::2] = 1.5                                 # many ties at +-1.5
    x[8, 1::2] = -1.5
    return x


@pytest.mark.parametrize("kind", ("q8_0", "q4_0", "q5_0"))
def test_ties_and_zeros_match_gguf_py(kind):
    """The blocks the kernels hand to their scalar second pass give gguf-py's bytes."""
    x = order_sensitive_blocks()
    theirs = gguf.quants.quantize(x, gguf.GGMLQuantizationType[kind.upper()])
    assert np.array_equal(convcore.quantize(x, kind).data["blocks"], theirs)


@pytest.mark.parametrize("kind", ("q4_1", "q5_1"))
def test_zero_min_keeps_the_first_zero_met(kind):
    """q4_1/q5_1: the f16 min of a block whose min is a zero carries the sign of the first
    zero met (ggml's C loop); every other byte equals gguf-py's."""
    x = order_sensitive_blocks()
    ours = convcore.quantize(x, kind).data["blocks"]
    theirs = gguf.quants.quantize(x, gguf.GGMLQuantizationType[kind.upper()])
    lo = x.min(axis=1)
    first_zero_sign = np.array([np.signbit(r[r == 0][0]) if (r == 0).any() else False for r in x])
    expected_min = np.where(lo == 0, np.where(first_zero_sign, -0.0, 0.0), lo).astype(np.float16)
    assert np.array_equal(ours[:, 2:4].copy().view(np.float16)[:, 0].view(np.uint16),
                          expected_min.view(np.uint16))
    assert np.array_equal(np.delete(ours, [2, 3], axis=1), np.delete(theirs, [2, 3], axis=1))
    assert np.array_equal(convcore.quantize(x, kind).dequantize(),
                          gguf.quants.dequantize(theirs, gguf.GGMLQuantizationType[kind.upper()]))
