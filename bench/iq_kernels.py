"""IQ types (iq4_nl, iq4_xs and whichever other IQ kernel modules are installed):
quant_rowwise's Numba kernels against ggml's C quantizer on the same f32 matrix.

Both sides get the same student-t (df 5) weights, the same importance vector (exp of a
normal times 2; ``--no-imatrix`` drops it for the types that run without one) and the
same thread count: ours through ``iquants.quantize_iq`` on ``numba.set_num_threads(n)``,
ggml's ``ggml_quantize_chunk`` (llama-cpp-python's libggml-base, through the tests'
``ggml_ref`` binding) on ``n`` row ranges in a thread pool (ctypes releases the GIL).
The two are timed alternately, ``--repeat`` rounds; the table gives best-of-rounds MB/s
of f32 input for each and ggml's best time over ours.

    .venv/bin/python bench/iq_kernels.py [--rows 4096] [--cols 4096] [--threads 1,2]
        [--types iq4_nl,iq4_xs] [--repeat 2] [--no-imatrix]
"""
from __future__ import annotations

import argparse
import importlib.util
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numba
import numpy as np

from quant_rowwise import iquants

ROOT = Path(__file__).resolve().parents[1]


def load_ggml_ref():
    """The tests' binding of ggml's quantizer (plugins/quant-rowwise/tests/ggml_ref.py)."""
    path = ROOT / "plugins" / "quant-rowwise" / "tests" / "ggml_ref.py"
    spec = importlib.util.spec_from_file_location("ggml_ref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ggml_runner(ref, name: str, x: np.ndarray, imatrix: np.ndarray | None, nthread: int):
    """A call that quantizes ``x`` with ggml_quantize_chunk on ``nthread`` row ranges at once."""
    lib = ref.library()
    qtype = ref.ggml_type(name)
    rows, n = x.shape
    block, size, _ = iquants.IQ_TYPES[name]
    out = np.empty((rows, n // block * size), np.uint8)
    qw = None if imatrix is None else imatrix.ctypes.data
    cuts = [rows * k // nthread for k in range(nthread + 1)]
    pool = ThreadPoolExecutor(nthread)

    def part(k: int) -> None:
        r0, r1 = cuts[k], cuts[k + 1]
        # start is counted in values; ggml writes from row start / n of dst
        lib.ggml_quantize_chunk(qtype, x.ctypes.data, out.ctypes.data, r0 * n, r1 - r0, n, qw)

    def run() -> np.ndarray:
        list(pool.map(part, range(nthread)))
        return out

    return run, pool


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--types", default=",".join(iquants.available()))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-imatrix", action="store_true")
    args = ap.parse_args()
    ref = load_ggml_ref()
    if ref.library() is None:
        raise SystemExit("llama-cpp-python's libggml-base is not installed")
    rng = np.random.default_rng(0)
    x = (rng.standard_t(5, (args.rows, args.cols)) * 0.02).astype(np.float32)
    w = np.exp(rng.standard_normal(args.cols) * 2).astype(np.float32)
    mb = x.nbytes / 1e6
    print(f"{args.rows}x{args.cols} f32 student-t ({mb:.0f} MB), "
          f"{'no imatrix where allowed' if args.no_imatrix else 'with an imatrix'}; "
          f"best of {args.repeat}")
    print("| type | threads | ours MB/s | ggml MB/s | speed-up | bytes equal |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    before = numba.get_num_threads()
    try:
        for name in args.types.split(","):
            imatrix = None if args.no_imatrix and name not in iquants.NEEDS_IMATRIX else w
            options = {"weights": imatrix}
            iquants.quantize_iq(x[:2], name, options)  # compile / load the cache
            for nthread in (int(t) for t in args.threads.split(",")):
                numba.set_num_threads(nthread)
                theirs, pool = ggml_runner(ref, name, x, imatrix, nthread)
                try:
                    ours_blocks = iquants.quantize_iq(x, name, options)["blocks"]
                    same = float((ours_blocks == theirs()).all(axis=1).mean())
                    pairs = np.array([(timed(lambda: iquants.quantize_iq(x, name, options)),
                                       timed(theirs)) for _ in range(args.repeat)])
                finally:
                    pool.shutdown()
                t_ours, t_ggml = pairs.min(axis=0)
                print(f"| {name} | {nthread} | {mb / t_ours:.1f} | {mb / t_ggml:.1f} "
                      f"| {t_ggml / t_ours:.2f}x | {same:.1%} of rows |", flush=True)
    finally:
        numba.set_num_threads(before)


if __name__ == "__main__":
    main()
