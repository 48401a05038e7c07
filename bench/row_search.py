"""Per-row codes: least-squares scale/zero point (the default) beside plain min/max, on
4096x4096 gaussian weights: relative error of the tensor and kernel time, same run.

    .venv/bin/python bench/row_search.py [--repeat 5]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import convcore


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    repeat = parser.parse_args().repeat
    x = np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32)
    norm = float(np.linalg.norm(x))
    print("| scheme | search | rel. error | best s | MB/s |")
    print("| --- | --- | ---: | ---: | ---: |")
    for bits in (1, 2, 4, 8):
        for search in ("minmax", "mse"):
            opts = {"search": search}
            qt = convcore.quantize(x, f"int{bits}-row", opts)   # also the warm-up
            err = float(np.linalg.norm(qt.dequantize() - x)) / norm
            times = []
            for _ in range(repeat):
                t = time.perf_counter()
                convcore.quantize(x, f"int{bits}-row", opts)
                times.append(time.perf_counter() - t)
            best = min(times)
            print(f"| int{bits}-row | {search} | {err:.4f} | {best:.3f} | {x.nbytes / 1e6 / best:.0f} |")


if __name__ == "__main__":
    main()
