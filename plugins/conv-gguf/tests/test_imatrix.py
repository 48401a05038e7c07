"""`convcore imatrix` and `run --imatrix`: llama.cpp's importance matrix, computed in
transformers, written in llama-imatrix's GGUF format, read back (also from the legacy
.dat), and used by the quantizers."""
from __future__ import annotations

import ctypes
import importlib.util
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from conv_gguf.imatrix import Imatrix, read_imatrix, write_imatrix
from convcore.testing.models import tiny_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXT = Path(__file__).resolve().parents[3] / "convcore" / "data" / "eval.txt"
LINEAR = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
          "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def _chunks(folder: Path, ctx: int, n: int) -> list[list[int]]:
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    ids = tok(TEXT.read_text(encoding="utf-8"))["input_ids"]
    out = [ids[c * ctx:(c + 1) * ctx] for c in range(min(n, len(ids) // ctx))]
    if tok.bos_token_id is not None and ids[0] == tok.bos_token_id:   # Qwen's adds none
        for piece in out:
            piece[0] = tok.bos_token_id
    return out


def _by_hooks(folder: Path, chunks: list[list[int]]) -> dict[str, np.ndarray]:
    """The expected sums, independently: a forward hook on every Linear of the layers."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    sums: dict[str, np.ndarray] = {}

    def hook(name):
        def fn(mod, inputs, output):
            x = inputs[0].detach().double().reshape(-1, inputs[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0).numpy()
        return fn

    for path, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in path:
            layer = path.split(".layers.")[1].split(".")[0]
            mod.register_forward_hook(hook(f"blk.{layer}.{LINEAR[path.rsplit('.', 1)[1]]}.weight"))
    with torch.no_grad():
        for piece in chunks:
            model(torch.tensor([piece]), use_cache=False)
    return sums


def _libggml():
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None:
        pytest.skip("llama-cpp-python is not installed")
    lib = next((Path(spec.submodule_search_locations[0]) / "lib").glob("libggml-base.so*"), None)
    if lib is None:
        pytest.skip("llama-cpp-python ships no libggml-base")
    return ctypes.CDLL(str(lib))


@pytest.fixture(scope="module")
def llama() -> Path:
    return tiny_model("llama", layers=2)


@pytest.fixture(scope="module")
def made(llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imatrix") / "imatrix.gguf"
    result = subprocess.run([sys.executable, "-m", "convcore", "imatrix", str(llama), "--text", str(TEXT),
                             "--ctx", "64", "--chunks", "3", "-o", str(out), "-q"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return out


def test_imatrix_equals_forward_hooks(llama, made):
    imx = read_imatrix(made)
    assert (imx.chunk_count, imx.chunk_size, imx.datasets) == (3, 64, [str(TEXT)])
    expected = _by_hooks(llama, _chunks(llama, 64, 3))
    assert sorted(imx.sums) == sorted(expected)   # every matrix of the layers, no output
    for name, want in expected.items():
        got = imx.sums[name][0]
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-4, name
        assert imx.counts[name].tolist() == [192.0]
        np.testing.assert_allclose(imx.importance(name)[0], want / 192, rtol=1e-4)


def test_imatrix_file_is_llama_imatrix_format(made):
    """The layout llama-imatrix writes, read by gguf-py and by llama.cpp's own gguf loader."""
    reader = gguf.GGUFReader(str(made))
    assert reader.fields["general.type"].contents() == "imatrix"
    names = [t.name for t in reader.tensors]
    entries = [n.removesuffix(".in_sum2") for n in names[::2]]
    assert entries == sorted(entries)   # entries in name order, each its sums then its counts
    assert names[1::2] == [f"{e}.counts" for e in entries]
    sums = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight.in_sum2")
    counts = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight.counts")
    assert sums.tensor_type == counts.tensor_type == gguf.GGMLQuantizationType.F32
    assert list(sums.shape) == [256, 1] and list(counts.shape) == [1, 1]   # ggml order
    lib = _libggml()

    class InitParams(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, InitParams]
    lib.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
    lib.gguf_get_n_tensors.restype = ctypes.c_int64
    lib.gguf_find_key.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.gguf_find_key.restype = ctypes.c_int64
    lib.gguf_get_val_u32.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_val_u32.restype = ctypes.c_uint32
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    ctx = lib.gguf_init_from_file(str(made).encode(), InitParams(True, None))
    assert ctx, "llama.cpp's gguf loader refused the file"
    try:
        assert lib.gguf_get_n_tensors(ctx) == len(names) == 2 * 7 * 2
        assert lib.gguf_get_val_u32(ctx, lib.gguf_find_key(ctx, b"imatrix.chunk_count")) == 3
        assert lib.gguf_get_val_u32(ctx, lib.gguf_find_key(ctx, b"imatrix.chunk_size")) == 64
        assert lib.gguf_find_key(ctx, b"imatrix.datasets") >= 0
    finally:
        lib.gguf_free(ctx)


def test_legacy_dat_reads_as_the_gguf(made, tmp_path):
    """llama.cpp's .dat stores mean*ncall per entry and a chunk/dataset trailer."""
    imx = read_imatrix(made)
    blob = struct.pack("<i", len(imx.sums))
    for name in imx.sums:
        ncall = 3
        mean = imx.importance(name)[0]
        blob += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, mean.size)
        blob += (mean * ncall).astype("<f4").tobytes()
    blob += struct.pack("<ii", 3, len("wiki.txt")) + b"wiki.txt"
    dat = tmp_path / "imatrix.dat"
    dat.write_bytes(blob)
    legacy = read_imatrix(dat)
    assert legacy.legacy and legacy.chunk_count == 3 and legacy.datasets == ["wiki.txt"]
    for name in imx.sums:
        np.testing.assert_allclose(legacy.importance(name), imx.importance(name), rtol=1e-6)


def test_roundtrip_and_expert_rows(tmp_path):
    sums = np.arange(12, dtype=np.float32).reshape(3, 4) + 1
    imx = Imatrix(sums={"blk.0.ffn_down_exps.weight": sums},
                  counts={"blk.0.ffn_down_exps.weight": np.array([2, 0, 4], np.float32)},
                  datasets=["a.txt"], chunk_count=1, chunk_size=8)
    write_imatrix(tmp_path / "m.gguf", imx)
    back = read_imatrix(tmp_path / "m.gguf")
    np.testing.assert_array_equal(back.sums["blk.0.ffn_down_exps.weight"], sums)
    imp = back.importance("blk.0.ffn_down_exps.weight")
    np.testing.assert_array_equal(imp[0], sums[0] / 2)
    np.testing.assert_array_equal(imp[1], np.ones(4, np.float32))   # an expert never reached
    np.testing.assert_array_equal(imp[2], sums[2] / 4)


@pytest.mark.parametrize("content, message", [
    pytest.param(b"", "not an importance matrix", marks=pytest.mark.full),
    (b"\x05\x00\x00\x00abc", "not an importance matrix"),
])
def test_broken_imatrix_is_one_line(tmp_path, content, message, run_cli, llama):
    bad = tmp_path / "bad.dat"
    bad.write_bytes(content)
    out = tmp_path / "out.gguf"
    result = run_cli("run", str(llama), "--to", "gguf", "--quant", "q4_k_m", "--imatrix", str(bad),
                     "-o", str(out), "-q")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and message in lines[0], result.stderr
    assert not out.exists() and bad.read_bytes() == content


@pytest.mark.full
def test_model_gguf_is_not_an_imatrix(tmp_path, run_cli, llama):
    model = tmp_path / "model.gguf"
    assert run_cli("run", str(llama), "--to", "gguf", "-o", str(model), "-q").returncode == 0
    result = run_cli("run", str(llama), "--to", "gguf", "--quant", "q4_0", "--imatrix", str(model),
                     "-o", str(tmp_path / "out.gguf"), "-q")
    assert result.returncode != 0 and "not an importance matrix" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.full
def test_imatrix_of_another_model_is_refused(tmp_path, run_cli, made):
    other = tiny_model("llama", layers=2, hidden=128, heads=2, kv_heads=1, ffn=256)
    result = run_cli("run", str(other), "--to", "gguf", "--quant", "q4_k_m", "--imatrix", str(made),
                     "-o", str(tmp_path / "out.gguf"), "-q")
    assert result.returncode != 0 and "made for another model" in result.stderr
    assert not (tmp_path / "out.gguf").exists()


def test_short_text_is_one_line(tmp_path, run_cli, llama):
    text = tmp_path / "short.txt"
    text.write_text("hello world")
    out = tmp_path / "m.gguf"
    result = run_cli("imatrix", str(llama), "--text", str(text), "-o", str(out), "-q")
    assert result.returncode != 0 and "fewer than one chunk of 512" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.full
def test_moe_imatrix_has_a_row_per_expert(tmp_path):
    """A stack of experts: one row per expert, each summing only the tokens routed to it
    (counts add up to tokens x experts per token), the down projection's input being
    what each expert computes, checked here from the stacked weights themselves."""
    src = tiny_model("qwen2_moe")
    out = tmp_path / "moe.imatrix.gguf"
    result = subprocess.run([sys.executable, "-m", "convcore", "imatrix", str(src), "--text", str(TEXT),
                             "--ctx", "64", "--chunks", "1", "-o", str(out), "-q"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    imx = read_imatrix(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    experts = model.model.layers[0].mlp.experts
    seen = {}
    def keep(mod, args, output):
        seen["args"] = args
    experts.register_forward_hook(keep)
    with torch.no_grad():
        model(torch.tensor(_chunks(src, 64, 1)), use_cache=False)
    hidden, index = seen["args"][0].double(), seen["args"][1]
    n_expert, k = experts.gate_up_proj.shape[0], index.shape[-1]
    counts = imx.counts["blk.0.ffn_gate_exps.weight"]
    assert counts.shape == (n_expert,) and counts.sum() == 64 * k
    for e in range(n_expert):
        x = hidden[(index == e).any(-1)]
        assert counts[e] == len(x)
        for name in ("ffn_gate_exps", "ffn_up_exps"):
            np.testing.assert_allclose(imx.sums[f"blk.0.{name}.weight"][e], (x * x).sum(0).numpy(), rtol=1e-4)
        gate, up = (x @ experts.gate_up_proj[e].detach().double().T).chunk(2, dim=-1)
        h = torch.nn.functional.silu(gate) * up
        np.testing.assert_allclose(imx.sums["blk.0.ffn_down_exps.weight"][e], (h * h).sum(0).numpy(),
                                   rtol=1e-4, atol=1e-9)
    assert imx.counts["blk.0.ffn_down_shexp.weight"].tolist() == [64.0]


def test_truncated_files_are_one_line(made, tmp_path):
    """A .dat whose values stop short and a GGUF imatrix cut in half: one ConvcoreError line
    naming the file (not numpy's or gguf-py's exception)."""
    import convcore

    dat = tmp_path / "short.dat"
    dat.write_bytes(struct.pack("<ii", 1, 5) + b"abcde" + struct.pack("<ii", 1, 1000) + bytes(40))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(made.read_bytes()[: made.stat().st_size // 2])
    for bad in (dat, cut):
        with pytest.raises(convcore.ConvcoreError, match=f"^{bad}: ") as caught:
            read_imatrix(bad)
        assert "\n" not in str(caught.value)
