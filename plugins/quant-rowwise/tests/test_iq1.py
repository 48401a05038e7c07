"""GGUF IQ1_S / IQ1_M: our blocks against llama.cpp's own quantizer (importance-weighted
error, identical rows) and our dequantizer against gguf-py's, bit for bit.

The comparisons with live ggml are in the full tier: ggml builds its IQ1 neighbour
tables on first use, about 16 CPU-seconds. The default tier checks our bytes against
digests of ggml's bytes for a fixed matrix (which the full tier re-measures).
"""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np
import pytest

from quant_rowwise import iq1, iquants

TYPES = ("iq1_s", "iq1_m")
DTYPES = {"f32": np.float32, "f16": np.float16, "bf16": ml_dtypes.bfloat16}
# (rows, columns, seed): realistic weights of a few widths
MATRICES = [(192, 256, 1), (96, 1024, 2), (32, 4096, 3)]
# sha256 of ggml's blocks (llama-cpp-python 0.3.36) for weights_like(48, 1024, 13)
GGML_DIGEST = {"iq1_s": "2f851184ea4cd7e0e706cef0e3bcc5b48e3b33ab19041f408908081dbd2b1ab7",
               "iq1_m": "13985e7213618a24476915bb963daada22ca758ee232879fb2b788820bcb3be2"}


def weights_like(rows, cols, seed):
    """Student-t rows (a few outliers) at a typical weight scale, and an importance
    vector that varies over columns by orders of magnitude, as an imatrix does."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(5, (rows, cols)) * 0.02).astype(np.float32)
    imatrix = np.exp(rng.standard_normal(cols) * 2).astype(np.float32)
    return x, imatrix


def gguf_dequantize(name, blocks, shape):
    with np.errstate(invalid="ignore"):  # NaN scales in random bytes
        y = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[name.upper()])
    return y.reshape(shape)


@pytest.fixture(scope="module")
def ggml():
    pytest.importorskip("llama_cpp")
    path = Path(__file__).with_name("ggml_ref.py")
    spec = importlib.util.spec_from_file_location("ggml_ref", path)
    ggml_ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ggml_ref)
    if ggml_ref.library() is None:
        pytest.skip("llama-cpp-python's libggml-base is not installed")
    return ggml_ref


# --- default tier --------------------------------------------------------------------

@pytest.mark.parametrize("name", TYPES)
def test_bytes_equal_ggmls_recorded_digest(name):
    x, imatrix = weights_like(48, 1024, 13)
    assert hashlib.sha256(iq1.quantize(name, x, imatrix).tobytes()).hexdigest() == GGML_DIGEST[name]


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_bit_identical_to_gguf(name):
    x, imatrix = weights_like(16, 1024, 5)
    size = iquants.IQ_TYPES[name][1]
    noise = np.random.default_rng(6).integers(0, 256, (16, 4 * size), dtype=np.uint8)
    for blocks in (iq1.quantize(name, x, imatrix), noise):  # any bytes: NaN/inf scales too
        ours = iq1.dequantize(name, blocks, (16, 1024))
        assert ours.dtype == np.float32
        theirs = gguf_dequantize(name, blocks, (16, 1024))
        assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("name", TYPES)
def test_half_input_reads_as_its_f32_values(name, dtype):
    x, imatrix = weights_like(32, 1024, 4)
    h = x.astype(DTYPES[dtype])
    assert np.array_equal(iq1.quantize(name, h, imatrix),
                          iq1.quantize(name, h.astype(np.float32), imatrix))


@pytest.mark.parametrize("name", TYPES)
def test_scheme_roundtrip_and_shapes(name):
    x, imatrix = weights_like(6, 512, 7)
    x = x.reshape(2, 3, 512)
    data = iquants.quantize_iq(x, name, {"weights": imatrix})
    assert data["blocks"].shape == (2, 3, 2 * iquants.IQ_TYPES[name][1])
    y = iquants.dequantize_iq(data, x.shape, name)
    assert y.shape == x.shape and np.isfinite(y).all()
    assert np.sum(imatrix * (y - x) ** 2) < 0.25 * np.sum(imatrix * x ** 2)
    zero = iq1.quantize(name, np.zeros((2, 256), np.float32), imatrix[:256])
    assert not zero.any()  # an all-zero row stays exactly zero
    big = iq1.quantize(name, x[0] * np.float32(1e5), imatrix)  # d past f16's range: clamped
    assert np.isfinite(iq1.dequantize(name, big, (3, 512))).all()


@pytest.mark.parametrize("name", TYPES)
def test_rejects_nan_inf_and_missing_importance(name):
    x, imatrix = weights_like(4, 512, 8)
    for bad in (np.nan, np.inf, -np.inf):
        for dtype in DTYPES.values():
            y = x.astype(dtype)
            y[2, 300] = bad
            with pytest.raises(iquants.IQuantError, match="NaN or Inf"):
                iq1.quantize(name, y, imatrix)
    with pytest.raises(iquants.IQuantError, match="importance matrix"):
        iquants.quantize_iq(x, name, {})
    w = imatrix.copy()
    w[3] = np.nan
    with pytest.raises(iquants.IQuantError, match="importance"):
        iq1.quantize(name, x, w)


@pytest.mark.parametrize("name", TYPES)
def test_bytes_do_not_depend_on_threads(name):
    import numba

    x, imatrix = weights_like(64, 1024, 9)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = iq1.quantize(name, x, imatrix)
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(iq1.quantize(name, x, imatrix), one)


def test_neighbour_lists_match_a_direct_search():
    """iq1_tables' vectorised builder against the plain definition on a sample of
    off-grid patterns: every grid point at the three nearest distances, by (distance, index)."""
    from quant_rowwise.iq1_tables import tables

    grid, kmap, nbrs = tables()
    codes = grid.astype(np.int64) + 1
    every = (np.arange(3 ** 8)[:, None] // 3 ** np.arange(8)) % 3
    keys = (every << (2 * np.arange(8))).sum(1)
    on = kmap[keys] >= 0
    assert on.sum() == 2048 and np.array_equal(codes[kmap[keys][on]], every[on])
    for i in np.random.default_rng(10).choice(np.nonzero(~on)[0], 100, replace=False):
        d2 = ((codes - every[i]) ** 2).sum(1)
        near = np.nonzero(d2 <= np.unique(d2)[2])[0]
        want = near[np.argsort(d2[near], kind="stable")]
        o = -kmap[keys[i]] - 1
        assert np.array_equal(nbrs[o + 1:o + 1 + nbrs[o]], want)


# --- full tier: live ggml ------------------------------------------------------------

def compare(ggml, name, x, imatrix):
    """(our weighted error / ggml's, rows whose bytes equal ggml's, ggml's error)."""
    ours = iq1.quantize(name, x, imatrix)
    x32 = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
    theirs = ggml.quantize(name, x32, imatrix)
    cols = x.shape[-1]
    e_ours = ggml.weighted_error(x32, ggml.dequantize(name, ours, cols), imatrix)
    e_theirs = ggml.weighted_error(x32, ggml.dequantize(name, theirs, cols), imatrix)
    same = int((ours.reshape(theirs.shape) == theirs).all(1).sum())
    return e_ours / e_theirs, same, e_theirs


@pytest.mark.full
@pytest.mark.llamacpp
@pytest.mark.parametrize("name", TYPES)
def test_weighted_error_at_most_ggml(ggml, name):
    total_ours = total_theirs = 0.0
    for rows, cols, seed in MATRICES:
        x, imatrix = weights_like(rows, cols, seed)
        ratio, same, e = compare(ggml, name, x, imatrix)
        print(f"{name} {rows}x{cols}: error ratio {ratio:.5f}, identical rows {same}/{rows}")
        assert ratio <= 1.05, (name, rows, cols, ratio)
        # the same float32 arithmetic as ggml's: nearly every row byte for byte
        assert same >= 0.9 * rows, (name, rows, cols, same)
        total_theirs += e
        total_ours += e * ratio
    assert total_ours <= 1.02 * total_theirs


@pytest.mark.full
@pytest.mark.llamacpp
@pytest.mark.parametrize("name", TYPES)
def test_recorded_digest_is_ggmls(ggml, name):
    x, imatrix = weights_like(48, 1024, 13)
    digest = hashlib.sha256(ggml.quantize(name, x, imatrix).tobytes()).hexdigest()
    assert digest == GGML_DIGEST[name]


@pytest.mark.full
@pytest.mark.llamacpp
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("name", TYPES)
def test_half_input_against_ggml(ggml, name, dtype):
    x, imatrix = weights_like(64, 1024, 4)
    ratio, same, _ = compare(ggml, name, x.astype(DTYPES[dtype]), imatrix)
    print(f"{name} {dtype} 64x1024: error ratio {ratio:.5f}, identical rows {same}/64")
    assert ratio <= 1.05 and same >= 0.9 * 64, (ratio, same)


@pytest.mark.full
@pytest.mark.llamacpp
@pytest.mark.parametrize("name", TYPES)
def test_awkward_rows_match_ggml(ggml, name):
    """Zero, constant, tiny and tied rows, and columns of zero importance: the same bytes
    as ggml's; and gguf-py decodes ggml's blocks as we do."""
    x, imatrix = weights_like(12, 512, 11)
    x[0] = 0
    x[1] = 0.5
    x[2, :256] = -3
    x[3] *= np.float32(1e-9)
    x[4, :32] = 0  # one all-zero group
    x[5, ::2] = 0
    x[6] = np.random.default_rng(12).integers(-2, 3, 512)  # many equal values
    x[7] = np.round(x[7] * 100) / 100
    imatrix[::3] = 0
    theirs = ggml.quantize(name, x, imatrix)
    assert np.array_equal(iq1.quantize(name, x, imatrix), theirs)
    ours = iq1.dequantize(name, theirs, x.shape)
    theirs_values = gguf_dequantize(name, theirs, x.shape)
    assert np.array_equal(ours.view(np.uint32), theirs_values.view(np.uint32))
