"""q2_k..q6_k: quant_rowwise's Numba k-quants against llama.cpp's C++ quantizer.

Builds a one-layer llama GGUF of four 4096x4096 f32 gaussian weights, quantizes it with
``llama_cpp.llama_model_quantize`` (2 threads, pure ftype so every weight gets the one
type) and with our kernels (2 Numba threads) on the same arrays, and prints per type:
MB/s of f32 input for both (llama.cpp's time includes reading and writing its files),
the ratio, ggml's in-memory kernel alone (``quantize_qN_K`` from llama-cpp-python's
libggml-base, called through ctypes on two row halves in two threads) and our ratio to
it, and the relative RMSE ||dequant - x|| / ||x|| of each (both dequantized with
gguf.quants.dequantize).

    .venv/bin/python bench/kquant_vs_llamacpp.py [--dim 4096] [--types q4_k,q6_k]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import tempfile
import time

import gguf
import numba
import numpy as np

from convcore.testing.llamacpp import llama_quantize
from quant_rowwise.kquants import SCHEMES

# llama.cpp file types whose pure output is all q{N}_K (the *_S mixes' base type)
FTYPES = {"q2_k": "q2_k", "q3_k": "q3_k_s", "q4_k": "q4_k_s", "q5_k": "q5_k_s", "q6_k": "q6_k"}
QTYPES = {"q2_k": gguf.GGMLQuantizationType.Q2_K, "q3_k": gguf.GGMLQuantizationType.Q3_K,
          "q4_k": gguf.GGMLQuantizationType.Q4_K, "q5_k": gguf.GGMLQuantizationType.Q5_K,
          "q6_k": gguf.GGMLQuantizationType.Q6_K}
NAMES = ("attn_q", "attn_k", "attn_v", "attn_output")


def write_llama_gguf(path: str, tensors: dict[str, np.ndarray], dim: int) -> None:
    """A minimal one-layer llama GGUF holding ``tensors`` (f32) and a 4-token vocab."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(dim)
    w.add_head_count(dim // 128)
    w.add_head_count_kv(dim // 128)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(128)
    w.add_file_type(0)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", "a"])
    w.add_token_scores([0.0, 0.0, 0.0, -1.0])
    w.add_token_types([2, 3, 3, 1])
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llamacpp_quantize(src: str, dst: str, name: str, nthread: int = 2) -> float:
    """Quantize ``src`` to ``dst`` with llama.cpp (pure ``name`` type); returns seconds."""
    t = time.perf_counter()
    llama_quantize(src, dst, FTYPES[name], threads=nthread, pure=True)
    return time.perf_counter() - t


def ggml_kernel_seconds(name: str, arrays: list[np.ndarray], nthread: int = 2) -> float:
    """Seconds for ggml's own quantize_qN_K over ``arrays``, ``nthread`` row ranges at once."""
    import llama_cpp
    from concurrent.futures import ThreadPoolExecutor

    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    fn = getattr(lib, f"quantize_{name[:2]}_K")
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    row_bytes = arrays[0].shape[1] // 256 * {"q2_k": 84, "q3_k": 110, "q4_k": 144,
                                              "q5_k": 176, "q6_k": 210}[name]
    outs = [np.empty((a.shape[0], row_bytes), np.uint8) for a in arrays]

    def run(a, o, r0, r1):
        fn(a[r0:].ctypes.data, o[r0:].ctypes.data, r1 - r0, a.shape[1], None)

    t = time.perf_counter()
    with ThreadPoolExecutor(nthread) as pool:
        for a, o in zip(arrays, outs):
            cuts = [a.shape[0] * k // nthread for k in range(nthread + 1)]
            list(pool.map(lambda k: run(a, o, cuts[k], cuts[k + 1]), range(nthread)))
    return time.perf_counter() - t


def read_dequantized(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file, dequantized to f32 by gguf-py."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        out[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        out[t.name + ":type"] = t.tensor_type
    return out


def rel_rmse(tensors: dict[str, np.ndarray], deq: dict[str, np.ndarray]) -> float:
    num = sum(float(np.sum((deq[k].astype(np.float64) - v) ** 2)) for k, v in tensors.items())
    den = sum(float(np.sum(v.astype(np.float64) ** 2)) for v in tensors.values())
    return (num / den) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--types", default=",".join(FTYPES))
    args = ap.parse_args()
    numba.set_num_threads(2)
    rng = np.random.default_rng(0)
    dim = args.dim
    tensors = {f"blk.0.{n}.weight": rng.standard_normal((dim, dim), dtype=np.float32)
               for n in NAMES}
    mb = sum(v.nbytes for v in tensors.values()) / 1e6
    schemes = {s.name: s for s in SCHEMES}
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "f32.gguf")
        write_llama_gguf(src, tensors, dim)
        print(f"{len(tensors)} x {dim}x{dim} f32 gaussian ({mb:.0f} MB), 2 threads each")
        print(f"{'type':6} {'ours MB/s':>10} {'llama MB/s':>11} {'ratio':>6} "
              f"{'ggml-kernel MB/s':>17} {'ratio':>6} {'ours rmse':>10} {'llama rmse':>11}")
        for name in args.types.split(","):
            sch = schemes[name]
            sch.quantize(tensors[next(iter(tensors))][:1])  # compile / load the cache
            t = time.perf_counter()
            ours = {k: sch.quantize(v) for k, v in tensors.items()}
            t_ours = time.perf_counter() - t
            deq_ours = {k: gguf.quants.dequantize(q["blocks"], QTYPES[name]).reshape(tensors[k].shape)
                        for k, q in ours.items()}
            dst = os.path.join(tmp, f"{name}.gguf")
            t_ll = llamacpp_quantize(src, dst, name)
            deq_ll = read_dequantized(dst)
            for k in tensors:
                assert deq_ll[k + ":type"] == QTYPES[name], (k, deq_ll[k + ":type"])
            os.remove(dst)
            t_k = ggml_kernel_seconds(name, list(tensors.values()))
            print(f"{name:6} {mb / t_ours:10.1f} {mb / t_ll:11.1f} {t_ll / t_ours:6.2f} "
                  f"{mb / t_k:17.1f} {t_k / t_ours:6.2f} {rel_rmse(tensors, deq_ours):10.5f} {rel_rmse(tensors, deq_ll):11.5f}")


if __name__ == "__main__":
    main()
