"""Every registered scheme's output is what its declared layout says (the core checks it
on each call; a mismatch raises), for every input float type and 2-D/3-D shapes."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import convcore
from quant_rowwise.iquants import NEEDS_IMATRIX

SCHEMES = sorted(s.name for s in convcore.get_registry().schemes.values()
                 if s.plugin == "quant_rowwise")


def test_every_scheme_is_registered():
    assert len(SCHEMES) == 63   # 54 + the nine IQ types
    assert {"iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_nl",
            "iq4_xs"} <= set(SCHEMES)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("shape", [(3, 256), (2, 2, 512)])
def test_output_matches_declared_layout(scheme, dtype, shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32).astype(dtype)
    # (an importance vector for the IQ types that need one; the others take it too)
    options = {"weights": np.linspace(0.5, 2, shape[-1], dtype=np.float32)} \
        if scheme in NEEDS_IMATRIX else None
    qt = convcore.quantize(x, scheme, options)   # raises if the output breaks the layout
    spec = convcore.get_registry().scheme(scheme)
    declared = spec.layout(shape, convcore.dtype_name(x.dtype))
    assert {k: (convcore.dtype_name(v.dtype), v.shape) for k, v in qt.data.items()} == \
        {k: (d, tuple(s)) for k, (d, s) in declared.items()}
    assert qt.dequantize().shape == shape


@pytest.mark.parametrize("scheme", ["int8-row", "int4-g64", "q4_k", "int4-b32"])
def test_the_threads_option_limits_the_kernels_not_the_codes(scheme, monkeypatch):
    """quantize(..., {"threads": 1}) runs the kernels on the calling thread only (a writer
    with threads of its own asks for that) and gives the same codes; the caller's
    thread count is back afterwards."""
    import numba

    from quant_rowwise import _threads

    x = np.random.default_rng(3).standard_normal((64, 512)).astype(np.float32)
    seen = []
    real = _threads.limited

    def spy(n):
        seen.append(n)
        return real(n)
    monkeypatch.setattr(_threads, "limited", spy)
    before = numba.get_num_threads()
    alone = convcore.quantize(x, scheme, {"threads": 1}).data
    assert seen == [1] and numba.get_num_threads() == before
    both = convcore.quantize(x, scheme).data
    assert seen == [1]
    assert alone.keys() == both.keys()
    for k in both:
        np.testing.assert_array_equal(alone[k], both[k])
