"""Compiling the GGUF row drivers (the k-quants', q8_0..q5_1's) ahead of use: each
missing one in a process of its own, side by side, into the kernel cache (``_cache``);
this process then loads them.

Two reasons. Time: a q4_k_m conversion needs the q4_K and q6_K drivers, which compile
in about 10 and 6 s; in two processes the wait is the longer one, not the sum. And
reproducibility: Numba's freshly compiled code and the same code loaded from its cache
can round float sums differently (the kernels use fast-math reassociation), so a
first run could write other bytes than every later one. Code that always comes from
the cache gives one answer. If the cache cannot be written, or a child fails, the
driver is compiled here as before.

Each scheme has a driver for quantizing without an importance matrix (``DRIVER``; for the
legacy types, legacy's block kernels) and one for quantizing with one (``WEIGHTED``: the
k-quants and q4_0 q4_1 q5_0 q5_1); ``prepare`` readies both.

``python -m quant_rowwise._compile FUNC ...`` is the child: it compiles the named
drivers for their one signature and exits.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
from typing import Iterable

# scheme -> the row driver that codes it without / with an importance matrix
DRIVER = {"q2_k": "rows_q2k", "q3_k": "rows_q3k", "q4_k": "rows_q45k", "q5_k": "rows_q45k",
          "q6_k": "rows_q6k", "q8_0": "blocks_q8_0", "q4_0": "blocks_sym",
          "q5_0": "blocks_sym", "q4_1": "blocks_min", "q5_1": "blocks_min"}
WEIGHTED = {"q2_k": "rows_q2k_w", "q3_k": "rows_q3k_w", "q4_k": "rows_q45k_w",
            "q5_k": "rows_q45k_w", "q6_k": "rows_q6k_w", "q4_0": "rows_legacy_w",
            "q4_1": "rows_legacy_w", "q5_0": "rows_legacy_w", "q5_1": "rows_legacy_w"}
# driver -> the module that defines it
_MODULE = {"rows_q2k": "kquant_pack", "rows_q3k": "kquant_pack", "rows_q45k": "kquant_pack",
           "rows_q6k": "kquant_pack", "rows_q2k_w": "kquant_wpack", "rows_q3k_w": "kquant_wpack",
           "rows_q45k_w": "kquant_wpack", "rows_q6k_w": "kquant_wpack",
           "rows_legacy_w": "legacy_imatrix", "blocks_q8_0": "legacy", "blocks_sym": "legacy",
           "blocks_min": "legacy"}
_lock = threading.Lock()


@functools.cache
def signature(func: str) -> tuple:
    """The one argument-type tuple a row driver is called with (kquants.quantize_kquant,
    legacy_imatrix.quantize): read-only uint16 bit rows, mode, the f16 table, [read-only
    float32 importance per column,] [nmax,] [affine,] refine, uint8 output rows, start,
    end. Legacy's block kernels (legacy._quantize_blocks): read-only float32 blocks and
    their uint32 bits, the output blocks (int8 for q8_0, else uint8), uint8 flags[, q5]."""
    from numba import types

    if func.startswith("blocks_"):
        blocks = (types.Array(types.float32, 2, "C", readonly=True),
                  types.Array(types.uint32, 2, "C", readonly=True),
                  types.Array(types.int8 if func == "blocks_q8_0" else types.uint8, 2, "C"),
                  types.Array(types.uint8, 1, "C"))
        return blocks if func == "blocks_q8_0" else blocks + (types.boolean,)
    rows = types.Array(types.uint16, 2, "C", readonly=True)
    head = (rows, types.int64, types.Array(types.uint32, 1, "C"))
    if func.endswith("_w"):
        head += (types.Array(types.float32, 1, "C", readonly=True),)
    if func in ("rows_q45k", "rows_q45k_w", "rows_legacy_w"):
        head += (types.int64,)
    if func == "rows_legacy_w":
        head += (types.boolean,)
    tail = (types.boolean, types.Array(types.uint8, 2, "C"), types.int64, types.int64)
    return head + tail


def _dispatcher(func: str):
    import importlib

    return getattr(importlib.import_module(f"{__package__}.{_MODULE[func]}"), func)


def _cached(disp, sig: tuple) -> bool:
    """Whether the cache holds ``sig`` (loading it costs milliseconds, compiling seconds)."""
    try:
        return disp._cache.load_overload(sig, disp.targetctx) is not None
    except Exception:  # a Numba without these internals: let the children find out
        return False


def _cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def ensure(schemes: Iterable[str], weighted: Iterable[bool] = (False, True)) -> None:
    """Have the row drivers of ``schemes`` ready in this process, compiling the missing
    ones in child processes (at most one per CPU at a time) first: those without an
    importance matrix (``False`` in ``weighted``), with one (``True``), or both."""
    tables = [WEIGHTED if w else DRIVER for w in dict.fromkeys(weighted)]
    funcs = list(dict.fromkeys(t[s] for s in schemes for t in tables if s in t))
    with _lock:
        todo = [f for f in funcs if signature(f) not in _dispatcher(f).overloads]
        missing = [f for f in todo if not _cached(_dispatcher(f), signature(f))]
        if missing:
            _compile_in_children(missing)
        for func in todo:
            _dispatcher(func).compile(signature(func))  # from the cache, or compiled here


def _compile_in_children(funcs: list[str]) -> None:
    slots = _cpus()
    running: list[subprocess.Popen] = []
    for func in funcs:
        if len(running) >= slots:
            running.pop(0).wait()
        running.append(subprocess.Popen([sys.executable, "-m", __name__, func],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL))
    for proc in running:
        proc.wait()


def main(argv: list[str]) -> int:
    for func in argv:
        _dispatcher(func).compile(signature(func))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
