"""Quantization kernel throughput: MB/s of f32 input on 4096x4096 gaussian weights, per
registered scheme, beside the peers that implement the same scheme, in the same run:
gguf-py's numpy ``gguf.quants.quantize`` (q8_0 q4_0 q4_1 q5_0 q5_1) and MLX's
``mx.quantize`` (affine groups, CPU). k-quants against llama.cpp's C++ quantizer are in
``bench/kquant_vs_llamacpp.py``.

    .venv/bin/python bench/quant_kernels.py [--schemes q8_0,int4-g64] [--repeat 3]

Where a peer exists the two are timed alternately, one call each per round; the table
gives best-of-rounds throughput for each, the ratio of the best times and the ratio of
the median times.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import convcore

MB = 4096 * 4096 * 4 / 1e6


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def best_of(fn, repeat: int) -> float:
    fn()  # warm-up (JIT, caches)
    return min(timed(fn) for _ in range(repeat))


def paired(ours, theirs, repeat: int) -> tuple[float, float, float, float]:
    """(our best time, their best time, our median, their median), the two sides timed
    alternately round after round, so a slow minute on this shared machine hits both
    rather than one."""
    ours()
    theirs()
    pairs = np.array([(timed(ours), timed(theirs)) for _ in range(repeat)])
    return (*pairs.min(axis=0), *np.median(pairs, axis=0))


def peer_for(name: str, x: np.ndarray):
    if name in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1"):
        import gguf
        qtype = gguf.GGMLQuantizationType[name.upper()]
        return "gguf.quants.quantize", lambda: gguf.quants.quantize(x, qtype)
    if name.startswith("int") and "-g" in name:
        import mlx.core as mx
        bits, group = (int(v) for v in name[3:].split("-g"))
        xm = mx.array(x)
        mx.eval(xm)
        return "mx.quantize (cpu)", lambda: mx.eval(*mx.quantize(xm, group_size=group, bits=bits))
    return None, None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--schemes", default="")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    registry = convcore.get_registry()
    wanted = [s for s in args.schemes.split(",") if s] or [
        n for n in registry.schemes if not n.endswith("_k")]
    x = np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32)
    print("| scheme | ours MB/s | peer | peer MB/s | speed-up (best) | speed-up (median) |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for name in wanted:
        peer, fn = peer_for(name, x)
        if fn is None:
            ours = best_of(lambda: registry.quantize(x, name), args.repeat)
            print(f"| {name} | {MB / ours:.0f} | - | - | - | - |", flush=True)
            continue
        ours, theirs, ours_med, theirs_med = paired(lambda: registry.quantize(x, name), fn, args.repeat)
        print(f"| {name} | {MB / ours:.0f} | {peer} | {MB / theirs:.0f} | {theirs / ours:.1f}x "
              f"| {theirs_med / ours_med:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
