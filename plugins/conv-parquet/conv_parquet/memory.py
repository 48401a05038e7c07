"""Keeping a large tensor's bytes resident only while something still needs them.

A tensor passes through several buffers on its way into or out of a Parquet value
(figures in docs/benchmarks.md, "hf <-> parquet"). Writing: the source's mapped pages,
pyarrow's encoder buffer, the page it assembles, the compressed page. Reading: the
compressed column chunk, the decompressed page, the decoded array. Three things keep
fewer of them resident at once:

- Pages of a read-only file mapping can leave this process at any moment
  (``madvise(MADV_DONTNEED)``): they stay in the page cache, and touching them again maps
  them back in. Dropping them costs at worst a page fault, never data, so it is safe
  whatever pyarrow is doing with them.
- pyarrow allocates the buffers of one large value from its memory pool one after the
  other, and has finished reading its input by the time it allocates the second one (the
  encoder's copy is done when it assembles the page; the page is decompressed when it
  allocates the decoded array). :class:`DropWhenCopied` watches the pool from a thread
  while pyarrow runs (it releases the GIL) and drops the mapped input's pages then. A
  pyarrow that allocated in another order would see them dropped too early (and map
  them back in) or only at the end; the bytes written or read are the same either way.
- pyarrow's allocator (mimalloc) keeps freed memory for reuse, which numpy's allocations
  cannot use: :func:`give_back` returns it to the system between large tensors.
"""
from __future__ import annotations

import mmap
import threading
from typing import Any, Self

import numpy as np
import pyarrow as pa

#: values at least this large get the treatment above; smaller ones cost little
#: memory, and the pool's cache spares them page faults
LARGE = 32 << 20
_POLL_S = 0.0005
_PAGE = mmap.PAGESIZE
_CAN_DROP = hasattr(mmap, "MADV_DONTNEED") and hasattr(mmap.mmap, "madvise")


class Region:
    """Bytes ``[start, stop)`` of a read-only shared file mapping ``mm``."""

    def __init__(self, mm: mmap.mmap, start: int, stop: int):
        self.mm, self.start, self.stop = mm, start, stop

    def drop(self) -> None:
        """Take the whole pages of the region out of this process's resident set (where
        the platform has ``madvise``)."""
        if not _CAN_DROP:
            return
        first = -(-self.start // _PAGE) * _PAGE
        try:
            last = min(self.stop, len(self.mm)) // _PAGE * _PAGE
            if last > first:
                self.mm.madvise(mmap.MADV_DONTNEED, first, last - first)
        except (OSError, ValueError):
            pass  # closed, or the kernel declined: only memory is at stake


def mapped_region(array: np.ndarray) -> Region | None:
    """Where ``array``'s bytes are, when they are a read-only ``np.memmap`` of a file (as
    the hf format's safetensors reader hands them out); None otherwise. Copy-on-write
    maps are left alone: dropping their pages would undo changes made to them."""
    base: Any = array
    while base is not None and not isinstance(base, np.memmap):
        base = getattr(base, "base", None)
    mm = getattr(base, "_mmap", None)
    if not _CAN_DROP or not isinstance(mm, mmap.mmap) or getattr(base, "mode", None) != "r":
        return None
    try:
        view = np.frombuffer(mm, np.uint8)
    except (TypeError, ValueError):
        return None
    origin = view.ctypes.data
    del view  # an exported buffer would keep the map from closing
    start = array.ctypes.data - origin
    if not 0 <= start <= start + array.nbytes <= len(mm):
        return None
    return Region(mm, start, start + array.nbytes)


def give_back() -> None:
    """Return the memory pyarrow's pool keeps for reuse to the system."""
    pa.default_memory_pool().release_unused()


class DropWhenCopied:
    """``with DropWhenCopied(region, nbytes): <pyarrow call>``: drops ``region``'s pages
    once pyarrow's pool has grown by 1.5 x ``nbytes`` during the call (its second buffer
    of that size: it has copied or decompressed the input), and again at the end.
    ``region`` None: does nothing."""

    def __init__(self, region: Region | None, nbytes: int):
        self.region, self.nbytes = region, nbytes
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        if self.region is not None and self.nbytes >= LARGE:
            pool = pa.default_memory_pool()
            self._thread = threading.Thread(target=self._watch, args=(pool, pool.bytes_allocated()),
                                            name="conv-parquet-drop", daemon=True)
            self._thread.start()
        return self

    def _watch(self, pool: pa.MemoryPool, start: int) -> None:
        while not self._stop.wait(_POLL_S):
            if pool.bytes_allocated() - start > 1.5 * self.nbytes:
                self.region.drop()  # type: ignore[union-attr]
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.region is not None:
            self.region.drop()
