"""Quantizing with an importance matrix, against llama-quantize given the same matrix: the
same type for every tensor (IQ mixes included), and tensors whose importance-weighted
error is within 2 % of llama.cpp's; the IQ types that need a matrix refused without one."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import convcore
from conv_gguf.imatrix import read_imatrix
from convcore.testing.llamacpp import llama_quantize

T = gguf.GGMLQuantizationType
pytestmark = pytest.mark.llamacpp
TEXT = Path(__file__).resolve().parents[3] / "convcore" / "data" / "eval.txt"
# file types llama.cpp makes without an importance matrix, and those it needs one for
WITHOUT = ["iq4_nl", "iq4_xs", "iq3_s", "iq3_m"]
WITH = ["q4_0", "q5_0", "q2_k", "q2_k_s", "q4_k_m", "iq4_xs", "iq3_xxs", "iq3_xs", "iq2_m", "iq2_s",
        "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s"]
SAMPLE = {"q4_k_m", "iq4_xs", "iq2_xxs"}   # make test; the rest in test-full


def _tensors(path: Path) -> dict[str, tuple[T, np.ndarray, tuple[int, ...]]]:
    reader = gguf.GGUFReader(str(path))
    return {t.name: (T(t.tensor_type), t.data, tuple(int(d) for d in reversed(t.shape.tolist())))
            for t in reader.tensors}


def _need(quant: str, model: Path, matrix: Path | None = None) -> None:
    from conv_gguf import mixes, writer
    _, planned, _ = writer.plan(convcore.load(model), {"quant": quant},
                                read_imatrix(matrix) if matrix else None)
    for item in planned:
        scheme = mixes.SCHEME_OF.get(item.gtype)
        if scheme and scheme not in convcore.get_registry().schemes:
            pytest.skip(f"scheme {scheme} not installed")


@pytest.fixture(scope="module")
def source(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def f32(source, gguf_dir) -> Path:
    return convcore.convert(source, gguf_dir / "imx-src-f32.gguf", to="gguf", quant="f32")


@pytest.fixture(scope="module")
def matrix(source, gguf_dir) -> Path:
    out = gguf_dir / "imx-llama.imatrix.gguf"
    if not out.exists():
        result = subprocess.run([sys.executable, "-m", "convcore", "imatrix", str(source), "--text",
                                 str(TEXT), "--ctx", "128", "-o", str(out), "-q"],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    return out


def _theirs(f32: Path, quant: str, matrix: Path | None, dst: Path) -> Path:
    values = None
    if matrix is not None:
        imx = read_imatrix(matrix)
        values = {name: imx.importance(name) for name in imx.sums}
    return llama_quantize(f32, dst, quant, imatrix=values)


def _weighted(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    return float((((x.astype(np.float64) - y) ** 2) * w).sum())


@pytest.mark.parametrize("quant", [pytest.param(q, marks=() if q in SAMPLE else pytest.mark.full) for q in WITH])
def test_imatrix_types_and_error_match_llama_quantize(quant, source, f32, matrix, gguf_dir):
    _need(quant, source, matrix)
    ours = convcore.convert(source, gguf_dir / f"imx-{quant}-ours.gguf", to="gguf", quant=quant,
                            options={"imatrix": str(matrix)}, force=True)
    theirs = _theirs(f32, quant, matrix, gguf_dir / f"imx-{quant}-theirs.gguf")
    a, b, ref = _tensors(ours), _tensors(theirs), _tensors(f32)
    assert {n: t for n, (t, _, _) in a.items()} == {n: t for n, (t, _, _) in b.items()}
    imx = read_imatrix(matrix)
    ratios = {}
    for name, (gtype, data, shape) in a.items():
        if gtype in (T.F32, T.F16, T.BF16):
            continue
        w = imx.importance(name)
        w = np.ones(shape[-1], np.float32) if w is None else w[0]
        x = np.asarray(ref[name][1], np.float32).reshape(shape)
        mine = gguf.quants.dequantize(data, gtype).reshape(shape)
        llama = gguf.quants.dequantize(b[name][1], gtype).reshape(shape)
        ratios[name] = _weighted(x, mine, w) / max(_weighted(x, llama, w), 1e-30)
    assert ratios
    total = np.mean(list(ratios.values()))
    assert total <= 1.02 and max(ratios.values()) <= 1.05, ratios
    reader = gguf.GGUFReader(str(ours))
    assert reader.fields["quantize.imatrix.file"].contents() == str(matrix)
    assert reader.fields["quantize.imatrix.entries_count"].contents() == len(imx.sums)


@pytest.mark.parametrize("quant", [pytest.param(q, marks=() if q == "iq4_xs" else pytest.mark.full) for q in WITHOUT])
def test_iq_mixes_without_imatrix_match_llama_quantize(quant, source, f32, gguf_dir):
    _need(quant, source)
    ours = convcore.convert(source, gguf_dir / f"noimx-{quant}-ours.gguf", to="gguf", quant=quant, force=True)
    theirs = _theirs(f32, quant, None, gguf_dir / f"noimx-{quant}-theirs.gguf")
    assert {n: t for n, (t, _, _) in _tensors(ours).items()} == \
        {n: t for n, (t, _, _) in _tensors(theirs).items()}


@pytest.mark.parametrize("quant", ["iq2_xxs", pytest.param("iq1_s", marks=pytest.mark.full),
                                   pytest.param("q2_k_s", marks=pytest.mark.full),
                                   pytest.param("iq3_xxs", marks=pytest.mark.full)])
def test_types_needing_an_imatrix_are_refused_without(quant, source, run_cli, tmp_path):
    out = tmp_path / "o.gguf"
    result = run_cli("run", str(source), "--to", "gguf", "--quant", quant, "-o", str(out), "-q")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs an importance matrix" in lines[0] and "convcore imatrix" in lines[0]
    assert not out.exists()


@pytest.mark.full
def test_imatrix_lowers_weighted_error(source, f32, matrix, gguf_dir):
    """q4_k_m with the matrix: every quantized tensor's importance-weighted error at most
    the same tensor's without it, the total clearly lower."""
    _need("q4_k_m", source)
    imx = read_imatrix(matrix)
    plain = _tensors(convcore.convert(source, gguf_dir / "plain-q4km.gguf", to="gguf", quant="q4_k_m", force=True))
    guided = _tensors(convcore.convert(source, gguf_dir / "guided-q4km.gguf", to="gguf", quant="q4_k_m",
                                       options={"imatrix": str(matrix)}, force=True))
    ref = _tensors(f32)
    before = after = 0.0
    for name, (gtype, data, shape) in guided.items():
        if gtype in (T.F32, T.F16, T.BF16) or imx.importance(name) is None:
            continue
        w = imx.importance(name)[0]
        x = np.asarray(ref[name][1], np.float32).reshape(shape)
        e0 = _weighted(x, gguf.quants.dequantize(plain[name][1], gtype).reshape(shape), w)
        e1 = _weighted(x, gguf.quants.dequantize(data, gtype).reshape(shape), w)
        assert e1 <= e0 * 1.001, name
        before, after = before + e0, after + e1
    assert after < 0.99 * before


@pytest.mark.parametrize("quant, shape, want", [
    ("iq2_xxs", (64, 320), T.IQ4_NL),   # 256-blocks fall back to iq4_nl, as llama.cpp's do
    ("iq4_xs", (64, 96), T.IQ4_NL),
    ("iq3_s", (64, 48), T.F16),         # not even a block of 32: f16
    ("iq4_nl", (64, 48), T.F16),
])
def test_rows_not_a_multiple_of_the_block_fall_back_and_say_so(quant, shape, want):
    from conv_gguf import mixes
    notes: list[str] = []
    got = mixes.choose_type(None, quant, "blk.0.ffn_up.weight", shape, T.F16, notes)
    assert got == want and len(notes) == 1 and f"falling back to {want.name.lower()}" in notes[0]
