"""conv_parquet.memory: which arrays have pages that may be dropped, and that dropping
them loses nothing (the resident-memory effect is measured in test_parquet_streaming)."""
from __future__ import annotations

import numpy as np

from conv_parquet.memory import DropWhenCopied, mapped_region


def test_a_view_into_a_read_only_map_has_its_exact_region(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, 1 << 20, dtype=np.uint8)
    (tmp_path / "x.bin").write_bytes(data.tobytes())
    mapped = np.memmap(tmp_path / "x.bin", np.uint8, "r", offset=12345, shape=(1 << 19,))
    view = mapped.view(np.uint16)[100:2000].reshape(100, 19)
    region = mapped_region(view)
    assert region is not None and region.stop - region.start == view.nbytes
    before = view.copy()
    region.drop()  # the pages come back from the file
    with DropWhenCopied(region, 64 << 20):  # a watcher that finds nothing to wait for
        pass
    assert np.array_equal(view, before)
    assert np.array_equal(np.asarray(mapped[200:3800]), data[12345 + 200:12345 + 3800])


def test_arrays_that_are_not_read_only_maps_are_left_alone(tmp_path):
    (tmp_path / "x.bin").write_bytes(bytes(4096))
    assert mapped_region(np.zeros(10)) is None
    assert mapped_region(np.memmap(tmp_path / "x.bin", np.uint8, "c", shape=(10,))) is None  # copy-on-write
    assert mapped_region(np.memmap(tmp_path / "x.bin", np.uint8, "r", shape=(10,)).copy()) is None
