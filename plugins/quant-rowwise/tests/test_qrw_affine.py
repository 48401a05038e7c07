"""int{2,3,4,5,6,8}-g{32,64,128}: identical to mlx.core.quantize / dequantize."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import convcore

SCHEMES = [(b, g) for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128)]


def sample(dtype, seed):
    w = np.random.default_rng(seed).standard_normal((8, 512)).astype(np.float32) * 0.05
    w[0] = 0.1                 # constant row
    w[1] = -np.abs(w[1])       # all negative
    w[2, :3] = 4.0             # one outlier group
    w[3, :128] = 0.0           # zero groups
    w[4] *= 1e-6               # tiny values (the 1e-7 scale floor)
    return w.astype(dtype)


@pytest.mark.mlx
@pytest.mark.parametrize("bits,group", SCHEMES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16], ids=lambda d: np.dtype(d).name)
def test_identical_to_mx_quantize(bits, group, dtype):
    mx = pytest.importorskip("mlx.core")
    w = sample(dtype, seed=bits * 1000 + group)
    mw = mx.array(w.astype(np.float32)).astype(getattr(mx, np.dtype(dtype).name))
    wq, scales, biases = mx.quantize(mw, group_size=group, bits=bits)
    qt = convcore.quantize(w, f"int{bits}-g{group}")
    assert qt.data["weight"].dtype == np.uint32
    assert np.array_equal(qt.data["weight"], np.array(wq))
    for ours, theirs in ((qt.data["scales"], scales), (qt.data["biases"], biases)):
        assert ours.dtype == np.dtype(dtype)
        assert np.array_equal(ours.astype(np.float32), np.array(theirs.astype(mx.float32)))
    want = np.array(mx.dequantize(wq, scales, biases, group_size=group, bits=bits).astype(mx.float32))
    np.testing.assert_array_equal(qt.dequantize(), want)


def test_three_dimensional_and_errors():
    w = np.random.default_rng(0).standard_normal((2, 3, 256)).astype(np.float32)
    qt = convcore.quantize(w, "int4-g64")
    assert qt.data["weight"].shape == (2, 3, 32) and qt.data["scales"].shape == (2, 3, 4)
    assert qt.dequantize().shape == w.shape
    with pytest.raises(convcore.ConvcoreError, match="not a multiple of int4-g64's block size 64"):
        convcore.quantize(w[..., :96], "int4-g64")
    w[0, 0, 0] = np.nan
    with pytest.raises(convcore.ConvcoreError, match="NaN or Inf"):
        convcore.quantize(w, "int4-g64")
