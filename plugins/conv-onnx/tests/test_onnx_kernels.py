"""The cast-and-transpose kernel equals numpy's concatenate + cast + transpose bit for bit."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from convcore import cast
from conv_onnx.kernels import transposed


@pytest.mark.parametrize("src,dst", [("bf16", "f32"), ("bf16", "f16"), ("f32", "f32"), ("f32", "f16"),
                                     ("f16", "f16"), ("f16", "f32")])
def test_transposed_matches_numpy(src: str, dst: str) -> None:
    types = {"bf16": ml_dtypes.bfloat16, "f32": np.float32, "f16": np.float16}
    rng = np.random.default_rng(0)
    # odd sizes (not multiples of the 64 tile), one part a strided view, extremes included
    parts = [rng.standard_normal((70, 131)).astype(types[src]),
             rng.standard_normal((131, 33)).astype(types[src]).T,
             (rng.standard_normal((5, 131)) * 1e5).astype(types[src])]
    parts[0][0, :4] = np.array([0.0, -0.0, np.inf, -np.inf]).astype(types[src])
    want = np.ascontiguousarray(cast(np.concatenate(parts, axis=0), dst).T)
    got = transposed(parts, dst)
    assert got.flags.c_contiguous and got.dtype == want.dtype and got.shape == (131, 108)
    assert got.tobytes() == want.tobytes()
