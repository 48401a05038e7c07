"""GGUF IQ3_XXS and IQ3_S: blocks checked against llama.cpp's own quantizer (ggml_quantize_chunk
from llama-cpp-python's libggml) and decoded by gguf-py."""
from __future__ import annotations

import importlib.util
import platform
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from quant_rowwise import iq3, iquants

TYPES = ("iq3_xxs", "iq3_s")
BLOCK_BYTES = {"iq3_xxs": 98, "iq3_s": 110}
# (rows, columns, seed) of the test matrices: student-t weights, a few hundred rows
MATRICES = [(256, 256, 1), (192, 1024, 2), (48, 4096, 3)]


def _load_ref():
    spec = importlib.util.spec_from_file_location("ggml_ref", Path(__file__).with_name("ggml_ref.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ggml_ref = _load_ref()


needs_ggml = ggml_ref.needs_ggml
weights_like_a_model = ggml_ref.weights_like_a_model
importance = ggml_ref.importance
gguf_dequantize = ggml_ref.dequantize


def compare(name, x, imatrix):
    """(our weighted error, ggml's, rows whose bytes equal ggml's) for the f32 matrix x."""
    return ggml_ref.compare(iq3.quantize, name, x, imatrix)


@pytest.mark.parametrize("use_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("name", TYPES)
def test_error_at_most_ggml(name, use_imatrix):
    """Importance-weighted squared error <= 1.02x ggml's over all matrices, <= 1.05x per
    matrix; the blocks themselves should be ggml's (the float32 steps are the same)."""
    needs_ggml()
    total_ours = total_theirs = 0.0
    same = rows = 0
    report = []
    for r, c, seed in MATRICES:
        x = weights_like_a_model(r, c, seed)
        imatrix = importance(c, seed) if use_imatrix else None
        e_ours, e_theirs, n_same = compare(name, x, imatrix)
        assert e_ours <= 1.05 * e_theirs, (name, (r, c), e_ours / e_theirs)
        total_ours += e_ours
        total_theirs += e_theirs
        same += n_same
        rows += r
        report.append(f"{r}x{c}: ratio {e_ours / e_theirs:.6f}, identical rows {n_same}/{r}")
    print(f"\n{name} {'imatrix' if use_imatrix else 'plain'}: total ratio "
          f"{total_ours / total_theirs:.6f}, identical rows {same}/{rows}; " + "; ".join(report))
    assert total_ours <= 1.02 * total_theirs
    if platform.machine() in ("x86_64", "AMD64"):
        # libggml for x86-64 is built without FMA contraction, as the kernels run
        assert same == rows


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_is_gguf_py_bit_for_bit(name):
    """On our blocks, on ggml's, and on random bytes (every code, scale and sign)."""
    x = weights_like_a_model(64, 1024, 9)
    w = importance(1024, 9)
    sources = [iq3.quantize(name, x, None), iq3.quantize(name, x, w)]
    rng = np.random.default_rng(4)
    noise = rng.integers(0, 256, (32, 4 * BLOCK_BYTES[name]), dtype=np.uint8)
    d = rng.standard_normal((32, 4)).astype(np.float16).view(np.uint8).reshape(32, 4, 2)
    noise.reshape(32, 4, -1)[:, :, :2] = d  # finite scales
    sources.append(noise)
    if ggml_ref.library() is not None:
        sources.append(ggml_ref.quantize(name, x, w))
    for blocks in sources:
        cols = blocks.shape[1] // BLOCK_BYTES[name] * 256
        ours = iq3.dequantize(name, blocks, (blocks.shape[0], cols))
        theirs = gguf_dequantize(name, blocks, cols)
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("name", TYPES)
def test_half_input_codes_as_its_f32_values(name, dtype):
    """f16/bf16 input, read as raw bits, gives the blocks of its exact f32 widening
    (and, with ggml present, ggml's blocks for those values)."""
    x = weights_like_a_model(64, 512, 5)
    w = importance(512, 5)
    half = x.astype(np.float16 if dtype == "f16" else ml_dtypes.bfloat16)
    wide = half.astype(np.float32)
    ours = iq3.quantize(name, half, w)
    np.testing.assert_array_equal(ours, iq3.quantize(name, wide, w))
    if ggml_ref.library() is not None:
        np.testing.assert_array_equal(ours, ggml_ref.quantize(name, wide, w))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", TYPES)
def test_non_finite_input_is_rejected(name, bad):
    x = weights_like_a_model(4, 512, 6)
    x[2, 300] = bad
    with pytest.raises(iquants.IQuantError, match="NaN or Inf"):
        iquants.quantize_iq(x, name)


@pytest.mark.parametrize("name", TYPES)
def test_scheme_round_trip_and_layout(name):
    schemes = {s.name: s for s in iquants.SCHEMES}
    assert name in schemes and name in iquants.available()
    x = weights_like_a_model(12, 768, 7).reshape(3, 4, 768)
    w = importance(768, 7)
    data = schemes[name].quantize(x, {"weights": w})
    assert set(data) == {"blocks"}
    assert data["blocks"].dtype == np.uint8
    assert data["blocks"].shape == (3, 4, 3 * BLOCK_BYTES[name])
    np.testing.assert_array_equal(data["blocks"].reshape(12, -1), iq3.quantize(name, x.reshape(12, -1), w))
    y = schemes[name].dequantize(data, x.shape)
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.linalg.norm(y - x) < 0.3 * np.linalg.norm(x)


@pytest.mark.parametrize("name", TYPES)
def test_zero_rows_and_zero_sub_blocks(name):
    """An all-zero block is all zero bytes. A zero sub-block inside a block leaves the
    other sub-blocks where they belong: their values come back as in a block without it
    (llama.cpp's IQ3_S shifts them into the wrong slots; its IQ3_XXS does not)."""
    x = weights_like_a_model(3, 512, 8)
    x[0] = 0.0
    x[2, 64:96] = 0.0
    blocks = iq3.quantize(name, x, None)
    assert not blocks[0].any()
    y = iq3.dequantize(name, blocks, x.shape)
    assert not y[0].any()
    err = np.abs(y[2] - x[2])
    assert err[:64].max() < 0.5 * np.abs(x[2, :64]).max()
    assert err[96:256].max() < 0.5 * np.abs(x[2, 96:256]).max()
    if ggml_ref.library() is not None:
        theirs = ggml_ref.quantize(name, x, None)
        np.testing.assert_array_equal(blocks[0], theirs[0])
        np.testing.assert_array_equal(blocks[1], theirs[1])
        e_ours = ggml_ref.weighted_error(x[2], gguf_dequantize(name, blocks[2:], 512), None)
        e_theirs = ggml_ref.weighted_error(x[2], gguf_dequantize(name, theirs[2:], 512), None)
        assert e_ours <= e_theirs
        if name == "iq3_xxs":
            np.testing.assert_array_equal(blocks[2], theirs[2])


def test_bytes_do_not_depend_on_threads():
    import numba

    x = weights_like_a_model(96, 1024, 10)
    w = importance(1024, 10)
    before = numba.get_num_threads()
    for name in TYPES:
        try:
            numba.set_num_threads(1)
            one = iq3.quantize(name, x, w)
        finally:
            numba.set_num_threads(before)
        np.testing.assert_array_equal(iq3.quantize(name, x, w), one)
