"""int{4,8}-b{16,32,64,128,256}[-asym]: byte-identical to ONNX Runtime's MatMulNBits
quantizer (``DefaultWeightOnlyQuantizer.qbits_block_quant``, i.e. the C++
``quantize_matmul_4bits`` / ``quantize_matmul_8bits``, as onnxruntime-genai's model
builder runs it), and dequantized as ORT's MatMulNBits node computes."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import convcore

pytestmark = pytest.mark.onnx

SCHEMES = [(b, k, sym) for b in (4, 8) for k in (16, 32, 64, 128, 256) for sym in (True, False)]
F32 = np.float32


def name(bits, block, sym):
    return f"int{bits}-b{block}" + ("" if sym else "-asym")


def ids(p):
    return name(*p)


def ort_quantize(w, bits, block, sym):
    """ORT's packed, scales, zero points for our [N, K] float32 weight (its B is [K, N])."""
    mnq = pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")
    cfg = mnq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=sym, bits=bits)
    return mnq.DefaultWeightOnlyQuantizer(cfg).qbits_block_quant(np.ascontiguousarray(w.T, F32))


def assert_identical(ours, w, bits, block, sym):
    packed, scales, zp = ort_quantize(w.reshape(-1, w.shape[-1]).astype(F32), bits, block, sym)
    assert ours["q"].dtype == np.uint8 and ours["q"].shape == packed.shape
    assert ours["scales"].dtype == F32 and ours["scales"].shape == scales.shape
    # raw bytes: also tells -0.0 from +0.0 in the scales
    assert ours["q"].tobytes() == packed.tobytes()
    assert ours["scales"].tobytes() == scales.tobytes()
    if sym:
        assert "zero_points" not in ours
    else:
        assert ours["zero_points"].dtype == np.uint8 and ours["zero_points"].shape == zp.shape
        assert ours["zero_points"].tobytes() == zp.tobytes()


def pattern_rows(bits, block):
    """Adversarial blocks (each tiled along a row): exact .5 ties after scaling, near
    ties, zeros of both signs, constants, outliers, denormals, huge values."""
    mid, qmax = 1 << (bits - 1), (1 << bits) - 1
    k = np.arange(block, dtype=F32)
    rows = []
    # symmetric scale exactly +-1 (the extreme is -+mid), codes at .5 ties both sides
    ties = (k % (2 * mid)) - mid + F32(0.5)
    rows.append(np.where(k == 0, F32(-mid), ties))
    rows.append(np.where(k == 0, F32(mid), -ties))
    # asymmetric scale exactly 1, the zero point -lo at a .5 tie, codes at .5 ties
    lo = -F32(mid) + F32(1.5)
    r = lo + (k % qmax)
    r[0], r[1] = lo, lo + qmax
    rows.append(r)
    # ties at other power-of-two scales, and the floats either side of them
    rows.append(rows[0] * F32(0.25))
    rows.append(np.nextafter(rows[0], F32(np.inf)) * F32(2.0 ** -10))
    rows.append(np.nextafter(rows[2], F32(-np.inf)) * F32(8.0))
    # non power-of-two scales: near ties through the reciprocal
    rows.append((k % 17 - 8 + F32(0.5)) * F32(0.1))
    rows.append(np.full(block, 0.0, F32))
    rows.append(np.full(block, -0.0, F32))
    rows.append(np.where(k % 3 == 0, F32(-0.0), F32(0.0)))       # first zero -0.0
    rows.append(np.where(k % 3 == 1, F32(-0.0), F32(0.0)))       # first zero +0.0
    rows.append(np.full(block, 0.37, F32))                       # constant
    rows.append(np.full(block, -1.25, F32))
    rows.append(np.where(k == 3, F32(1e4), F32(0.01) * np.sin(k)))  # one outlier
    rows.append(np.where(k == 5, F32(-1e4), F32(0.01) * np.cos(k)))
    rows.append(-np.abs(np.sin(k + 1)))                          # all negative
    rows.append(np.abs(np.sin(k + 1)) + F32(0.5))                # all positive, no 0
    rows.append(np.where(k == 0, F32(1.0), F32(-1.0)))           # |max| == |min|
    rows.append(np.where(k % 2 == 0, F32(3.0), F32(-3.0)))
    # denormals: a denormal scale whose reciprocal overflows (0 * inf codes)
    rows.append(np.where(k % 4 == 0, F32(1e-40), np.where(k % 4 == 1, F32(-5e-41), F32(0.0))))
    rows.append(np.where(k % 2 == 0, F32(1e-45), F32(0.0)))
    rows.append((np.sin(k) * F32(1e-38)).astype(F32))
    # huge: (max - min) overflows to inf in the asymmetric scale
    rows.append(np.where(k % 3 == 0, F32(3e38), np.where(k % 3 == 1, F32(-3e38), F32(1.0))))
    rows.append(np.where(k == 0, F32(-3.4e38), F32(2.0)))
    return np.stack([r.astype(F32) for r in rows])


def tiled(rows, length):
    reps = -(-length // rows.shape[1])
    return np.ascontiguousarray(np.tile(rows, (1, reps))[:, :length])


def random_weights(shape, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(F32)
    return w * rng.uniform(1e-3, 4.0, (*shape[:-1], 1)).astype(F32)


def lengths(block):
    # multiples; a short last block; an odd K whose last value is alone in its pair of
    # blocks, or in its block, or shares it; K shorter than one block
    return [4 * block, 3 * block + 5, 4 * block + 1, block + 1, 3, 1, 2 * block - 1]


@pytest.mark.parametrize("p", SCHEMES, ids=ids)
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16],
                         ids=lambda d: np.dtype(d).name)
def test_random_identical_to_onnxruntime(p, dtype):
    bits, block, sym = p
    for i, k in enumerate(lengths(block)):
        w = random_weights((6, k), seed=bits * 1000 + block + i).astype(dtype)
        qt = convcore.quantize(w, name(*p))
        # f16/bf16 are quantized from their float32 values
        assert_identical(qt.data, w.astype(F32), bits, block, sym)


@pytest.mark.parametrize("p", SCHEMES, ids=ids)
def test_adversarial_identical_to_onnxruntime(p):
    bits, block, sym = p
    rows = pattern_rows(bits, block)
    for k in (2 * block, 3 * block + 7, 2 * block + 1):
        w = tiled(rows, k)
        assert_identical(convcore.quantize(w, name(*p)).data, w, bits, block, sym)
    # blocks of mixed patterns, and each row shifted so a pattern straddles blocks
    mixed = np.concatenate([rows[::-1], rows], axis=1)
    w = tiled(np.roll(mixed, block // 3, axis=1), 5 * block - 3)
    assert_identical(convcore.quantize(w, name(*p)).data, w, bits, block, sym)
    # f16 ties: f16 values quantized from their float32 values
    w16 = tiled(rows[:7], 3 * block).astype(np.float16)
    assert_identical(convcore.quantize(w16, name(*p)).data, w16.astype(F32), bits, block, sym)


def test_matches_the_pybind_functions_directly():
    """The quantizer class above only allocates buffers for the C++ functions; calling
    those directly on the unpadded [K, N] weight gives the same bytes."""
    pybind = pytest.importorskip("onnxruntime.capi._pybind_state")
    w = random_weights((9, 200), seed=7)
    for bits, block, sym in [(4, 32, True), (4, 64, False), (8, 16, True), (8, 128, False)]:
        n, k = w.shape
        kb = -(-k // block)
        packed = np.zeros((n, kb, block * bits // 8), np.uint8)
        zp = np.zeros((n, -(-kb // (8 // bits))), np.uint8)
        scales = np.zeros((n, kb), F32)
        fn = pybind.quantize_matmul_4bits if bits == 4 else pybind.quantize_matmul_8bits
        fn(packed, np.ascontiguousarray(w.T), scales, zp, block, n, k, sym)
        ours = convcore.quantize(w, name(bits, block, sym)).data
        assert ours["q"].tobytes() == packed.tobytes()
        assert ours["scales"].tobytes() == scales.tobytes()
        assert sym or ours["zero_points"].tobytes() == zp.tobytes()


@pytest.mark.parametrize("p", SCHEMES, ids=ids)
def test_leading_axes_flatten_into_rows(p):
    bits, block, sym = p
    w = random_weights((2, 3, 2 * block + 3), seed=block)
    qt = convcore.quantize(w, name(*p))
    n_blocks = 3
    assert qt.data["q"].shape == (6, n_blocks, block * bits // 8)
    assert qt.data["scales"].shape == (6, n_blocks)
    if not sym:
        assert qt.data["zero_points"].shape == (6, 2 if bits == 4 else 3)
    assert_identical(qt.data, w, bits, block, sym)
    assert qt.dequantize().shape == w.shape


def dequantize_reference(data, bits, block, sym, shape):
    """(code - zp) * scale from the packed arrays, in numpy."""
    q = data["q"]
    if bits == 4:
        q = np.stack([q & 15, q >> 4], axis=-1).reshape(q.shape[0], q.shape[1], -1)
    n_blocks = q.shape[1]
    if sym:
        zp = np.full((q.shape[0], n_blocks), 1 << (bits - 1))
    else:
        z = data["zero_points"]
        zp = np.stack([z & 15, z >> 4], axis=-1).reshape(z.shape[0], -1)[:, :n_blocks] if bits == 4 else z
    w = (q.astype(np.int32) - zp[..., None].astype(np.int32)).astype(F32) * data["scales"][..., None]
    return w.reshape(q.shape[0], -1)[:, :shape[-1]].reshape(shape)


@pytest.mark.parametrize("p", SCHEMES, ids=ids)
def test_dequantize_round_trip(p):
    bits, block, sym = p
    w = random_weights((8, 3 * block + 5), seed=3)
    qt = convcore.quantize(w, name(*p))
    deq = qt.dequantize()
    assert deq.dtype == F32 and deq.shape == w.shape
    np.testing.assert_array_equal(deq, dequantize_reference(qt.data, bits, block, sym, w.shape))
    # every value within one step of its block's scale (a symmetric block's far side
    # clamps at mid - 1; an asymmetric zero point is rounded), most within half a step
    n_blocks = qt.data["scales"].shape[1]
    step = np.repeat(np.abs(qt.data["scales"]), block, axis=1)[:, :w.shape[1]]
    err = np.abs(deq - w)
    assert (err <= step * F32(1.0001)).all()
    assert (err <= step * F32(0.5001)).mean() > 0.95
    assert n_blocks == 4
    # relative RMS error of the right size for the bit width
    rel = np.sqrt(np.mean(err ** 2)) / np.sqrt(np.mean(w ** 2))
    assert rel < (0.15 if bits == 4 else 0.01)


def matmulnbits_dense(data, bits, block, n, k):
    """ORT's MatMulNBits node run on X = eye(K): its dequantized B, [K, N]."""
    ort = pytest.importorskip("onnxruntime")
    helper = pytest.importorskip("onnx.helper")
    numpy_helper = pytest.importorskip("onnx.numpy_helper")
    from onnx import TensorProto

    inits = [numpy_helper.from_array(data["q"], "B"), numpy_helper.from_array(data["scales"], "scales")]
    inputs = ["A", "B", "scales"]
    if "zero_points" in data:
        inits.append(numpy_helper.from_array(data["zero_points"], "zero_points"))
        inputs.append("zero_points")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft",
                            K=k, N=n, bits=bits, block_size=block)
    graph = helper.make_graph(
        [node], "mnb", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": np.eye(k, dtype=F32)})[0]


@pytest.mark.parametrize("p", SCHEMES, ids=ids)
def test_dequantize_matches_onnxruntime_matmulnbits(p):
    bits, block, sym = p
    for n, k in ((6, 2 * block), (5, 3 * block + 7), (3, block + 1)):
        w = random_weights((n, k), seed=n * k)
        qt = convcore.quantize(w, name(*p))
        deq = qt.dequantize()
        y = matmulnbits_dense(qt.data, bits, block, n, k)
        assert y.shape == (k, n)
        np.testing.assert_allclose(y, deq.T, rtol=1e-6, atol=1e-6 * float(np.abs(deq).max()))


def test_registered_through_the_core():
    reg = convcore.get_registry()
    names = {name(*p) for p in SCHEMES}
    assert len(names) == 20
    assert names <= set(reg.schemes)
    for n in names:
        spec = reg.scheme(n)
        assert spec.plugin == "quant_rowwise" and spec.family == "matmulnbits"
        assert spec.block_size == 1   # any row length: MatMulNBits pads the last block
    w = random_weights((4, 100), seed=1)
    qt = convcore.quantize(w, "int4-b32")
    assert qt.scheme == "int4-b32" and qt.shape == (4, 100)
    assert {k: (v.dtype, v.shape) for k, v in qt.data.items()} == {
        "q": (np.uint8, (4, 4, 16)), "scales": (F32, (4, 4))}
    qa = convcore.quantize(w, "int8-b64-asym")
    assert {k: v.shape for k, v in qa.data.items()} == {
        "q": (4, 2, 64), "scales": (4, 2), "zero_points": (4, 2)}
    assert reg.scheme("int4-b16-asym").layout((3, 5, 40), "bf16") == {
        "q": ("u8", (15, 3, 8)), "scales": ("f32", (15, 3)), "zero_points": ("u8", (15, 2))}


def test_nan_and_inf_are_refused():
    for bad in (np.nan, np.inf, -np.inf):
        w = random_weights((3, 70), seed=2)
        w[1, 45] = bad
        for scheme in ("int4-b32", "int8-b16-asym"):
            with pytest.raises(convcore.ConvcoreError, match="NaN or Inf"):
                convcore.quantize(w, scheme)


def test_quant_rowwise_does_not_depend_on_onnxruntime():
    pkg = Path(__file__).resolve().parents[1] / "quant_rowwise"
    for path in pkg.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(m.split(".")[0] in ("onnx", "onnxruntime") for m in mods), path
    code = ("import sys, numpy as np, convcore\n"
            "qt = convcore.quantize(np.ones((2, 40), np.float32), 'int4-b32-asym')\n"
            "qt.dequantize()\n"
            "assert not [m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime')]\n")
    env = {**os.environ, "CONVCORE_LOAD_PLUGINS": "quant_rowwise"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
