"""Running a serial Numba kernel that releases the GIL over a range of work on threads.

The kernels here are compiled without ``parallel=True``: Numba's parallel lowering types
and compiles a loop body twice, which doubled the first-use compile time. Threads give
the same speed for work split into runs of a few hundred blocks.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor


def thread_count() -> int:
    """Threads for a kernel: Numba's setting (NUMBA_NUM_THREADS, set_num_threads)."""
    import numba

    return max(1, numba.get_num_threads())


@contextmanager
def limited(threads: int) -> Iterator[None]:
    """At most ``threads`` threads for the kernels called in this block on this thread
    (Numba's thread count is per calling thread: other threads keep theirs)."""
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(before)


def run_split(kernel: Callable[..., int], args: tuple, total: int, runs: int = 256) -> int:
    """Call ``kernel(*args, start, end)`` over ``runs`` consecutive runs of range(total), on
    up to ``thread_count()`` threads, and return the sum of what the calls return.

    Runs are handed out one at a time, so a thread slowed by other work on a shared machine
    takes fewer of them rather than holding the others up.
    """
    if total <= 0:
        return 0
    runs = max(1, min(total, runs))
    bounds = iter([(c * total // runs, (c + 1) * total // runs) for c in range(runs)])
    nthreads = min(thread_count(), runs)
    if nthreads == 1:
        return sum(kernel(*args, s, e) for s, e in bounds)
    lock = threading.Lock()

    def worker() -> int:
        done = 0
        while True:
            with lock:
                run = next(bounds, None)
            if run is None:
                return done
            done += kernel(*args, *run)

    futures = [_pool(nthreads).submit(worker) for _ in range(nthreads)]
    return sum(f.result() for f in futures)


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(nthreads: int) -> ThreadPoolExecutor:
    """A pool of ``nthreads`` threads kept for the process: a reader calls kernels a few
    hundred times per model, and starting threads each time cost a tenth of the work.
    Callers on several threads share it (their runs queue; workers never wait on each
    other)."""
    with _POOLS_LOCK:
        pool = _POOLS.get(nthreads)
        if pool is None:
            pool = _POOLS[nthreads] = ThreadPoolExecutor(nthreads, thread_name_prefix="quant-rowwise")
        return pool


def _forget_pools() -> None:
    """In a forked child the pools' threads do not exist: start new ones on demand."""
    global _POOLS_LOCK
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_pools)
