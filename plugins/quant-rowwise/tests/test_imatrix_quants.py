"""Quantizing with an importance matrix (``options["weights"]``): q4_0 q4_1 q5_0 q5_1 and
the k-quants against llama.cpp's own quantizer given the same importance vector
(importance-weighted error, identical rows), and the checks on the weights."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import convcore
import quant_rowwise
from quant_rowwise import kquants, legacy

TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
SCHEMES = {s.name: s for s in quant_rowwise._schemes() if s.name in (*TYPES, "q8_0")}
DTYPES = {"f16": np.float16, "bf16": ml_dtypes.bfloat16}
# (rows, columns, seed): realistic weights of a few widths
MATRICES = [(192, 256, 1), (96, 1024, 2), (32, 4096, 3)]


def weights_like(rows, cols, seed):
    """Student-t rows (a few outliers) at a typical weight scale, and an importance
    vector that varies over columns by orders of magnitude, as an imatrix does."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(5, (rows, cols)) * 0.02).astype(np.float32)
    imatrix = np.exp(rng.standard_normal(cols) * 2).astype(np.float32)
    return x, imatrix


def quantize(name, x, imatrix, refine=True):
    """Our blocks: through the scheme (as a converter calls it), or with refine=False the
    search alone, as llama.cpp codes it."""
    if refine:
        options = {"name": "blk.0.ffn_down.weight"}
        if imatrix is not None:
            options["weights"] = imatrix
        return SCHEMES[name].quantize(x, options)["blocks"]
    if name.endswith("_k"):
        return kquants.quantize_kquant(x, name, refine=False, weights=imatrix)["blocks"]
    return legacy.quantize(name, x, imatrix, refine=False)["blocks"]


@pytest.fixture(scope="module")
def ggml():
    pytest.importorskip("llama_cpp")
    spec = importlib.util.spec_from_file_location("ggml_ref",
                                                  Path(__file__).with_name("ggml_ref.py"))
    ggml_ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ggml_ref)
    if ggml_ref.library() is None:
        pytest.skip("llama-cpp-python's libggml-base is not installed")
    return ggml_ref


def errors(ggml, name, x, imatrix, blocks):
    x32 = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
    return ggml.weighted_error(x32, ggml.dequantize(name, blocks, x.shape[-1]), imatrix)


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", TYPES)
def test_weighted_error_at_most_ggml(ggml, name):
    """Per tensor at most 1.05x ggml's importance-weighted error, over all at most 1.02x;
    llama.cpp's search alone (no refinement) within 1% of ggml's, with most rows byte-equal."""
    totals = np.zeros(3)
    for rows, cols, seed in MATRICES:
        x, imatrix = weights_like(rows, cols, seed)
        theirs = ggml.quantize(name, x, imatrix)
        ours = quantize(name, x, imatrix)
        search = quantize(name, x, imatrix, refine=False)
        e = [errors(ggml, name, x, imatrix, b) for b in (theirs, ours, search)]
        totals += e
        same = [int((b.reshape(theirs.shape) == theirs).all(1).sum()) for b in (ours, search)]
        print(f"{name} {rows}x{cols}: ratio {e[1] / e[0]:.4f} (search alone {e[2] / e[0]:.4f}), "
              f"identical rows {same[0]}/{rows} ({same[1]}/{rows})")
        assert e[1] <= 1.05 * e[0], (name, rows, cols, e[1] / e[0])
        assert e[2] <= 1.01 * e[0], (name, rows, cols, e[2] / e[0])
        assert same[1] >= rows * 3 // 4, (name, rows, cols, same[1])
    assert totals[1] <= 1.02 * totals[0], (name, totals[1] / totals[0])


@pytest.mark.parametrize("name", TYPES)
def test_importance_lowers_the_weighted_error(name):
    for rows, cols, seed in MATRICES[:2]:
        x, imatrix = weights_like(rows, cols, seed)
        weighted = SCHEMES[name].dequantize({"blocks": quantize(name, x, imatrix)}, x.shape)
        plain = SCHEMES[name].dequantize({"blocks": quantize(name, x, None)}, x.shape)
        e_weighted = float((imatrix * (weighted - x).astype(np.float64) ** 2).sum())
        e_plain = float((imatrix * (plain - x).astype(np.float64) ** 2).sum())
        assert e_weighted < 0.9 * e_plain, (name, cols, e_weighted / e_plain)


@pytest.mark.llamacpp
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", TYPES)
def test_f16_and_bf16_input(ggml, name, dtype):
    """Narrow input is widened exactly: the same bytes as its f32 values give, and within
    the bar of ggml's blocks for those values."""
    x, imatrix = weights_like(64, 1024, 4)
    narrow = x.astype(DTYPES[dtype])
    x32 = narrow.astype(np.float32)
    ours = quantize(name, narrow, imatrix)
    assert np.array_equal(ours, quantize(name, x32, imatrix))
    theirs = ggml.quantize(name, x32, imatrix)
    ratio = errors(ggml, name, x32, imatrix, ours) / errors(ggml, name, x32, imatrix, theirs)
    assert ratio <= 1.05, (name, dtype, ratio)


@pytest.mark.parametrize("name", (*TYPES, "q8_0"))
def test_bad_weights_raise_a_clear_error(name):
    x, imatrix = weights_like(4, 512, 5)
    bad = {"found shape (513,)": np.ones(513, np.float32), "found shape (1, 512)": imatrix[None],
           "found shape ()": np.float32(1.0),
           "hold NaN or Inf": np.where(np.arange(512) == 7, np.nan, imatrix),
           "must not be negative": -imatrix}
    for message, weights in bad.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            SCHEMES[name].quantize(x, {"weights": weights})
        # through the core, as a converter calls it: one line naming the tensor
        with pytest.raises(convcore.ConvcoreError, match=re.escape(message)) as info:
            convcore.quantize(x, name, {"name": "blk.3.attn_q.weight", "weights": weights})
        assert "blk.3.attn_q.weight" in str(info.value) and "\n" not in str(info.value)


def test_q8_0_ignores_the_weights():
    x, imatrix = weights_like(8, 512, 6)
    assert np.array_equal(quantize("q8_0", x, imatrix), quantize("q8_0", x, None))


@pytest.mark.parametrize("name", TYPES)
def test_zero_importance_zero_rows_and_bad_input(name):
    x, imatrix = weights_like(6, 512, 7)
    x[0] = 0.0
    x[1, :256] = 0.25
    imatrix[:256] = 0.0  # a whole super-block that no activation reached
    imatrix[300:310] = 0.0
    y = SCHEMES[name].dequantize({"blocks": quantize(name, x, imatrix)}, x.shape)
    assert np.isfinite(y).all()
    assert not y[0].any()
    # the columns that matter are still coded well
    live = imatrix > 0
    assert np.abs(y[2:, live] - x[2:, live]).max() < np.abs(x[2:, live]).max()
    x[3, 100] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf in input"):
        quantize(name, x, imatrix)


@pytest.mark.parametrize("name", TYPES)
def test_bytes_do_not_depend_on_threads(name):
    import numba
    from concurrent.futures import ThreadPoolExecutor

    x, imatrix = weights_like(48, 1024, 8)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = quantize(name, x, imatrix)
    finally:
        numba.set_num_threads(before)
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: quantize(name, x, imatrix), range(3)))
    for blocks in results:
        assert np.array_equal(blocks, one)
