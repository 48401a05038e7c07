"""Streaming: writing and reading hold about one tensor, not the model. An 800 MB model
of 16 MB tensors converts with a peak RSS under 400 MB each way (measured in a child)."""
from __future__ import annotations

import numpy as np
import pytest

import convcore
from parquet_helpers import peak_rss_mb

pytestmark = pytest.mark.slow
TENSORS, SHAPE = 48, (2048, 2048)  # 48 x 16.8 MB of f32 = 805 MB


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    root = tmp_path_factory.mktemp("large")
    rng = np.random.default_rng(0)

    def produce():
        yield rng.standard_normal(SHAPE, dtype=np.float32)

    src = root / "src"
    src.mkdir()
    convcore.write_sharded(src, [convcore.PlannedTensor(f"layers.{i}.weight", "f32", SHAPE, produce)
                                 for i in range(TENSORS)], max_shard_size=1 << 40)
    (src / "config.json").write_text('{"model_type": "llama"}')
    return root, src


@pytest.mark.parametrize("quant", [None, "int8-row"])
def test_peak_memory_is_bounded_by_a_tensor_not_the_model(large, registry, quant):
    root, src = large
    size_mb = TENSORS * np.prod(SHAPE) * 4 / 1e6
    out = root / f"{quant or 'f32'}.parquet"
    extra = ["--quant", quant] if quant else []
    write = peak_rss_mb("run", src, "-o", out, "--to", "parquet", *extra, "--no-validate", "-q")
    read = peak_rss_mb("run", out, "-o", root / f"back-{quant}", "--to", "hf", "--no-validate", "-q")
    print(f"{quant}: write {write:.0f} MB, read {read:.0f} MB, model {size_mb:.0f} MB")
    assert write < 400 and read < 400, (write, read, size_mb)
    assert write < size_mb / 2 and read < size_mb / 2
