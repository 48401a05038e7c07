"""GGUF IQ4_NL and IQ4_XS: blocks checked against llama.cpp's own quantizer
(ggml_quantize_chunk from llama-cpp-python's libggml) and decoded by gguf-py."""
from __future__ import annotations

import importlib.util
import platform
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from quant_rowwise import iq4, iq4_pack, iquants

TYPES = ("iq4_nl", "iq4_xs")
BLOCK = {"iq4_nl": (32, 18), "iq4_xs": (256, 136)}  # values, bytes
# (rows, columns, seed) of the test matrices: student-t weights, a few hundred rows
MATRICES = [(256, 256, 1), (192, 1024, 2), (48, 4096, 3)]
# libggml for x86-64 is built without FMA contraction, as the kernels run: the same
# float32 steps, so the same bytes
SAME_BYTES = platform.machine() in ("x86_64", "AMD64")


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
    return ggml_ref.compare(iq4.quantize, name, x, imatrix)


@pytest.mark.parametrize("use_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("name", TYPES)
def test_error_at_most_ggml(name, use_imatrix):
    """Importance-weighted squared error <= 1.02x ggml's over all matrices, <= 1.05x per
    matrix; on x86-64 every row's bytes are ggml's."""
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
    if SAME_BYTES:
        assert same == rows


@pytest.mark.parametrize("name", TYPES)
def test_awkward_rows_are_ggml_bytes(name):
    """Zero rows (iq4_xs writes its scale as -0.0, f16 0x8000), constant rows, values
    below ggml's 1e-15 cut-off, a lone spike, zero importance over whole sub-blocks, and
    (iq4_nl) rows that are not a multiple of 256."""
    needs_ggml()
    cols = 96 if name == "iq4_nl" else 512
    rng = np.random.default_rng(11)
    x = weights_like_a_model(10, cols, 11)
    x[0] = 0.0
    x[1] = -0.0
    x[2] = 0.5
    x[3] = rng.standard_normal(cols) * 1e-16
    x[4] = 0.0
    x[4, 37] = -1.0
    x[5, :40] = 0.0
    x[6] = np.round(rng.standard_normal(cols) * 4)
    x[7] *= 1e4
    w = importance(cols, 11)
    w[:64] = 0.0
    for imatrix in (None, w):
        ours = iq4.quantize(name, x, imatrix)
        theirs = ggml_ref.quantize(name, x, imatrix)
        if SAME_BYTES:
            np.testing.assert_array_equal(ours, theirs)
        else:
            e = [ggml_ref.weighted_error(x, gguf_dequantize(name, b, cols), imatrix) for b in (ours, theirs)]
            assert e[0] <= 1.05 * e[1]
    if name == "iq4_xs":
        assert ours[0, :2].tobytes() == b"\x00\x80"


def best_index_int8(a):
    """ggml's best_index_int8 on kvalues_iq4nl for a float32 array: its binary search's
    bracket, then the nearer level by its float32 differences (a tie goes up)."""
    kv = iq4_pack.KVALUES
    lo = np.clip(np.searchsorted(kv, a, side="right") - 1, 0, 14)
    pick = np.where(a - kv[lo] < kv[lo + 1] - a, lo, lo + 1)
    pick[a <= kv[0]] = 0
    pick[a >= kv[15]] = 15
    return pick


def test_level_search_is_ggml_best_index():
    """The branch-free midpoint count picks ggml's level for every float32 tried: 4096
    neighbours either side of each midpoint and level, and a million values at random
    (all of them, |a| < 192, were checked once, outside the suite)."""
    import numba

    @numba.njit
    def ours(a):
        idx = np.empty(a.size, np.int64)
        lev = np.empty(a.size, np.float32)
        for i in range(a.size):
            idx[i] = iq4_pack.index(a[i])
            lev[i] = iq4_pack.level(a[i])
        return idx, lev

    kv = iq4_pack.KVALUES
    marks = np.concatenate([(kv[:-1] + kv[1:]) / np.float32(2), kv]).astype(np.float32)
    near = (marks.view(np.int32)[:, None] + np.arange(-4096, 4097, dtype=np.int32)).view(np.float32)
    rand = np.random.default_rng(12).uniform(-140, 140, 1_000_000).astype(np.float32)
    a = np.concatenate([near.ravel(), rand, np.float32([0.0, -0.0, 1e-30, -1e-30, 1e9, -1e9])])
    idx, lev = ours(a)
    np.testing.assert_array_equal(idx, best_index_int8(a))
    np.testing.assert_array_equal(lev, kv[idx])


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_is_gguf_py_bit_for_bit(name):
    """On our blocks, on ggml's, and on random bytes (every code, scale, sign and f16
    special, NaN payloads included)."""
    x = weights_like_a_model(64, 1024, 9)
    w = importance(1024, 9)
    sources = [iq4.quantize(name, x, None), iq4.quantize(name, x, w)]
    values, size = BLOCK[name]
    sources.append(np.random.default_rng(4).integers(0, 256, (32, 4 * size), dtype=np.uint8))
    if ggml_ref.library() is not None:
        sources += [ggml_ref.quantize(name, x, None), ggml_ref.quantize(name, x, w)]
    for blocks in sources:
        cols = blocks.shape[1] // size * values
        ours = iq4.dequantize(name, blocks, (blocks.shape[0], cols))
        with np.errstate(invalid="ignore"):
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
    for imatrix in (None, w):
        ours = iq4.quantize(name, half, imatrix)
        np.testing.assert_array_equal(ours, iq4.quantize(name, wide, imatrix))
        if SAME_BYTES and ggml_ref.library() is not None:
            np.testing.assert_array_equal(ours, ggml_ref.quantize(name, wide, imatrix))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", TYPES)
def test_non_finite_input_is_rejected(name, bad):
    x = weights_like_a_model(4, 512, 6)
    x[2, 300] = bad
    x[3, 10] = bad
    with pytest.raises(iquants.IQuantError, match=r"NaN or Inf in input \(2 of"):
        iquants.quantize_iq(x, name)
    with pytest.raises(iquants.IQuantError, match="NaN or Inf"):
        iquants.quantize_iq(x.astype(np.float16), name)


@pytest.mark.parametrize("name", TYPES)
def test_scheme_round_trip_and_layout(name):
    schemes = {s.name: s for s in iquants.SCHEMES}
    assert name in schemes and name in iquants.available()
    values, size = BLOCK[name]
    x = weights_like_a_model(12, 768, 7).reshape(3, 4, 768)
    w = importance(768, 7)
    data = schemes[name].quantize(x, {"weights": w})
    assert set(data) == {"blocks"}
    assert data["blocks"].dtype == np.uint8
    assert data["blocks"].shape == (3, 4, 768 // values * size)
    np.testing.assert_array_equal(data["blocks"].reshape(12, -1), iq4.quantize(name, x.reshape(12, -1), w))
    y = schemes[name].dequantize(data, x.shape)
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.linalg.norm(y - x) < 0.15 * np.linalg.norm(x)


def test_bytes_do_not_depend_on_threads():
    import numba

    x = weights_like_a_model(96, 1024, 10)
    w = importance(1024, 10)
    before = numba.get_num_threads()
    for name in TYPES:
        try:
            numba.set_num_threads(1)
            one = iq4.quantize(name, x, w)
        finally:
            numba.set_num_threads(before)
        np.testing.assert_array_equal(iq4.quantize(name, x, w), one)
