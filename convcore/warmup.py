"""``convcore warmup``: have every registered quantization scheme ready before first use.

Scheme plugins that compile kernels (Numba, say) keep them in an on-disk
cache; a scheme's first use in a fresh install pays the compile. Warming up runs each
scheme's ``prepare`` and then quantizes and dequantizes a small array of every float input
type with it, spread over worker processes, so the cache holds everything a conversion
will ask for. ``make install`` runs it; it is safe to run again (cached kernels load in
milliseconds).

    python -m convcore.warmup SCHEME ...   # the worker: warms these schemes here
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from typing import Any

import numpy as np

from .model import ConvcoreError, one_line
from .registry import FLOAT_SCHEMES, get_registry


def schemes(names: list[str] | None = None, registry: Any = None) -> list[str]:
    """The quantized schemes to warm: ``names`` (checked) or every registered one."""
    registry = registry or get_registry()
    if names:
        for name in names:
            registry.scheme(name)  # an unknown name is an error naming the known ones
        return list(dict.fromkeys(names))
    return sorted(n for n in registry.schemes if n not in FLOAT_SCHEMES)


def sample(block_size: int, dtype: str) -> np.ndarray:
    """A small gaussian array of ``dtype`` whose rows fit ``block_size`` and 256-wide
    super-blocks: what a scheme's kernels are compiled for on a real tensor."""
    from .model import cast

    n = math.lcm(256, max(1, block_size))
    values = np.random.default_rng(0).standard_normal((4, n)).astype(np.float32) * 0.02
    return cast(values, dtype)


def warm_here(names: list[str], registry: Any = None) -> dict[str, str]:
    """Warm ``names`` in this process; returns {scheme: error} for the ones that failed."""
    registry = registry or get_registry()
    failed: dict[str, str] = {}
    registry.prepare(names)
    for name in names:
        scheme = registry.scheme(name)
        try:
            for dtype in FLOAT_SCHEMES:
                array = sample(scheme.block_size, dtype)
                # with per-column importance too (an imatrix): schemes that use it have
                # kernels of their own for it; those that need it refuse to go without
                weights = np.linspace(0.5, 2.0, array.shape[-1], dtype=np.float32)
                packed = registry.quantize(array, name, {"name": "warmup", "weights": weights})
                try:
                    packed = registry.quantize(array, name, {"name": "warmup"})
                except ConvcoreError as exc:
                    if "importance" not in str(exc):
                        raise
                scheme.dequantize(packed.data, array.shape)
                if scheme.dequantize_to is not None:
                    scheme.dequantize_to(packed.data, array.shape, "f16")
        except Exception as exc:  # noqa: BLE001 - reported per scheme
            failed[name] = one_line(exc)
    return failed


def warm(names: list[str], jobs: int) -> dict[str, str]:
    """Warm ``names`` over ``jobs`` worker processes (the schemes' ``prepare`` runs first,
    here, so plugins that compile side by side do that across all their schemes);
    returns {scheme: error} for failures."""
    registry = get_registry()
    registry.prepare(names)
    if jobs <= 1:
        return warm_here(names, registry)
    parts = [names[i::jobs] for i in range(jobs) if names[i::jobs]]
    procs = [subprocess.Popen([sys.executable, "-m", __name__, *part], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for part in parts]
    failed: dict[str, str] = {}
    for part, proc in zip(parts, procs):
        out, _ = proc.communicate()
        for line in out.splitlines():
            name, _, error = line.partition("\t")
            if name in part:
                failed[name] = error
        if proc.returncode and not any(n in failed for n in part):
            for name in part:
                failed[name] = f"worker process exited with status {proc.returncode}"
    return failed


def main(argv: list[str]) -> int:
    """The worker: warm the named schemes, print ``name<TAB>error`` per failure."""
    try:
        failed = warm_here(argv)
    except ConvcoreError as exc:
        failed = {name: str(exc) for name in argv}
    for name, error in failed.items():
        print(f"{name}\t{error}")
    return 0


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
