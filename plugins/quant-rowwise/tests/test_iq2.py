"""IQ2 types (iq2_xxs, iq2_xs, iq2_s): our bytes against llama.cpp's own quantizer (same
matrix, same importance vector), our dequantizer against gguf-py's, the grid data against
gguf-py's grids and the neighbour tables against a direct reading of ggml's builder."""
from __future__ import annotations

import importlib.util
import platform
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np
import pytest

from quant_rowwise import iq2, iq_grid, iquants

TYPES = ("iq2_xxs", "iq2_xs", "iq2_s")
# (rows, columns, seed) of the test matrices: a few hundred rows of 256..4096 columns
MATRICES = [(192, 256, 1), (48, 1024, 2), (12, 4096, 3)]
DTYPES = {"f16": np.float16, "bf16": ml_dtypes.bfloat16}
# libggml for x86-64 is built without FMA contraction, as the kernels run: the same
# float32 steps, so the same bytes (elsewhere a compiler may fuse them and round apart)
SAME_BYTES = platform.machine() in ("x86_64", "AMD64")


def _load_ref():
    spec = importlib.util.spec_from_file_location("ggml_ref", Path(__file__).with_name("ggml_ref.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ggml_ref = _load_ref()


def weights_and_imatrix(rows: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Student-t rows (df 5: a few outliers) and an importance vector spread over decades."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(5, (rows, n)) * 0.02).astype(np.float32)
    return x, np.exp(rng.normal(size=n) * 2).astype(np.float32)


def needs_ggml():
    pytest.importorskip("llama_cpp")
    if ggml_ref.library() is None:
        pytest.skip("llama-cpp-python's libggml-base is not installed")


def compare(name: str, x: np.ndarray, imatrix: np.ndarray | None, ours_input=None):
    """(our weighted error, ggml's, byte-identical rows) for one matrix; ``ours_input``
    (default ``x``) is what we quantize, ``x`` what ggml does and the errors are taken to."""
    theirs = ggml_ref.quantize(name, x, imatrix)
    ours = iq2.quantize(name, x if ours_input is None else ours_input, imatrix)
    ours = ours.reshape(theirs.shape)
    n = x.shape[-1]
    e_ours = ggml_ref.weighted_error(x, ggml_ref.dequantize(name, ours, n), imatrix)
    e_theirs = ggml_ref.weighted_error(x, ggml_ref.dequantize(name, theirs, n), imatrix)
    return e_ours, e_theirs, int((ours == theirs).all(axis=1).sum())


@pytest.mark.parametrize("name", TYPES)
def test_error_at_most_ggml_with_imatrix(name, record_property):
    needs_ggml()
    total_ours = total_theirs = 0.0
    for rows, n, seed in MATRICES:
        x, imatrix = weights_and_imatrix(rows, n, seed)
        e_ours, e_theirs, same = compare(name, x, imatrix)
        record_property(f"{rows}x{n}", f"ratio {e_ours / e_theirs:.5f}, identical rows {same}/{rows}")
        assert e_ours <= 1.05 * e_theirs, (name, rows, n, e_ours / e_theirs)
        # the kernels follow ggml operation by operation: every row is ggml's
        assert same == rows or not SAME_BYTES, (name, rows, n, same)
        total_ours += e_ours
        total_theirs += e_theirs
    assert total_ours <= 1.02 * total_theirs


def test_iq2_s_without_imatrix_matches_ggml():
    needs_ggml()
    for rows, n, seed in MATRICES:
        x, _ = weights_and_imatrix(rows, n, seed + 10)
        e_ours, e_theirs, same = compare("iq2_s", x, None)
        assert e_ours <= 1.02 * e_theirs and (same == rows or not SAME_BYTES), (rows, n, same)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", TYPES)
def test_half_input_matches_ggml_on_its_widening(name, dtype):
    """f16/bf16 input read from its raw bits codes what ggml codes for the f32 values."""
    needs_ggml()
    x, imatrix = weights_and_imatrix(32, 512, 4)
    half = x.astype(DTYPES[dtype])
    e_ours, e_theirs, same = compare(name, half.astype(np.float32), imatrix, ours_input=half)
    assert e_ours <= 1.02 * e_theirs and (same == 32 or not SAME_BYTES), (name, dtype, same)


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_equals_gguf(name):
    """Bit for bit on our blocks, on ggml's, and on arbitrary bytes (every grid index,
    scale and sign pattern)."""
    x, imatrix = weights_and_imatrix(24, 1024, 5)
    sources = [iq2.quantize(name, x, imatrix).reshape(24, -1)]
    if ggml_ref.library() is not None:
        sources.append(ggml_ref.quantize(name, x, imatrix))
    size = iquants.IQ_TYPES[name][1]
    noise = np.random.default_rng(6).integers(0, 256, (16, 4 * size), dtype=np.uint8)
    noise.reshape(-1, size)[:, 1] &= 0x3B  # keep d a finite f16 of moderate size
    sources.append(noise)
    for blocks in sources:
        rows = blocks.shape[0]
        ours = iq2.dequantize(name, blocks, (rows, blocks.shape[1] // size * 256))
        theirs = ggml_ref.dequantize(name, blocks, blocks.shape[1] // size * 256)
        assert ours.dtype == np.float32
        assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)), name


@pytest.mark.parametrize("name", TYPES)
def test_scheme_roundtrip_shapes(name):
    """Through the registered scheme: n-d input, layout, and an error a 2-bit code gives."""
    x, imatrix = weights_and_imatrix(6, 512, 7)
    x = x.reshape(2, 3, 512)
    data = iquants.quantize_iq(x, name, {"weights": imatrix})
    size = iquants.IQ_TYPES[name][1]
    assert data["blocks"].shape == (2, 3, 2 * size) and data["blocks"].dtype == np.uint8
    y = iquants.dequantize_iq(data, x.shape, name)
    assert y.shape == x.shape
    rel = np.linalg.norm(y - x) / np.linalg.norm(x)
    assert 0.05 < rel < 0.5, rel


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", TYPES)
def test_non_finite_input_rejected(name, bad):
    x, imatrix = weights_and_imatrix(4, 512, 8)
    x[2, 300] = bad
    with pytest.raises(iquants.IQuantError, match="NaN or Inf"):
        iq2.quantize(name, x, imatrix)


@pytest.mark.parametrize("name", ["iq2_xxs", "iq2_xs"])
def test_importance_required(name):
    x, _ = weights_and_imatrix(2, 256, 9)
    with pytest.raises(iquants.IQuantError, match="importance"):
        iquants.quantize_iq(x, name, {})


def test_degenerate_blocks_match_ggml():
    """All-zero blocks, a block of one value, tiny values near ggml's epsilons, half-empty
    blocks, and an importance vector with zeros (zero weights in the searches)."""
    needs_ggml()
    rows = [np.zeros(256), np.full(256, 0.37), np.full(256, -1e-9), np.full(256, 1e-20)]
    rng = np.random.default_rng(12)
    mixed = rng.standard_normal(256)
    mixed[:128] = 0.0
    rows += [mixed, rng.standard_normal(256) * 1e3, rng.integers(-3, 4, 256).astype(float)]
    x = np.array(rows, np.float32)
    imatrix = np.exp(rng.normal(size=256)).astype(np.float32)
    holes = np.where(rng.random(256) < 0.3, 0.0, imatrix).astype(np.float32)
    for name in TYPES:
        for imx in [imatrix, holes] + ([None] if name == "iq2_s" else []):
            theirs = ggml_ref.quantize(name, x, imx)
            ours = iq2.quantize(name, x, imx)
            assert np.array_equal(ours, theirs) or not SAME_BYTES, name


def test_grid_data_matches_gguf():
    for name in TYPES:
        qtype = gguf.GGMLQuantizationType[name.upper()]
        cls = gguf.quants._type_traits[qtype]
        cls.init_grid()
        assert np.array_equal(iq2.coords(name), cls.grid.reshape(iq2.coords(name).shape))


def test_neighbour_lists_follow_ggml_rule():
    """For sampled off-grid codes: all grid points of the nwant smallest distances,
    nearest first, by index among equals (the order of ggml's qsort on (d2, index))."""
    rng = np.random.default_rng(13)
    for name, nwant in (("iq2_xxs", 2), ("iq2_xs", 2), ("iq2_s", 1)):
        t = iq2.tables(name)
        pts = t.points.astype(np.int64)
        assert (t.kmap[iq2_codes(pts)] == np.arange(len(pts))).all()
        ternary = ((np.arange(3 ** 8)[:, None] // 3 ** np.arange(8)) % 3 << (2 * np.arange(8))).sum(1)
        off = ternary[t.kmap[ternary] < 0]
        assert len(off) + len(pts) == 3 ** 8
        for code in np.concatenate([off[:5], rng.choice(off, 40)]):
            pos = 2 * ((code >> (2 * np.arange(8))) & 3) + 1
            d2 = ((pts - pos) ** 2).sum(axis=1)
            keep = np.isin(d2, np.unique(d2)[:nwant])
            want = sorted(np.flatnonzero(keep), key=lambda j: (d2[j], j))
            o = -int(t.kmap[code]) - 1
            assert t.neighbours[o + 1:o + 1 + int(t.neighbours[o])].tolist() == want


def iq2_codes(points: np.ndarray) -> np.ndarray:
    return (((points - 1) // 2) << (2 * np.arange(8))).sum(axis=1)


def test_iq_grid_levels_rejects_foreign_coordinates():
    grid = np.array([0x0808080808080808, 0x0808080808080809], np.uint64)
    with pytest.raises(ValueError):
        iq_grid.levels(grid, iq2.COORDS)
