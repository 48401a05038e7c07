"""Streaming: writing and reading hold about one tensor, not the model. An 800 MB model
of 16 MB tensors converts with a peak RSS under 400 MB each way, and a large tensor costs
pyarrow's own buffers for it and little more (measured in a child)."""
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


@pytest.mark.parametrize("quant", [pytest.param(None, marks=pytest.mark.full), "int8-row"])
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


# Two tensors above conv_parquet.memory.LARGE (64 MiB of bf16 each, where the 1.1B bench
# model's embedding and lm_head are 125 MiB) with a small one between them. What a
# conversion holds beyond converting a tiny model (the interpreter, pyarrow and, with
# --quant, Numba's kernels) should be pyarrow's own buffers for one value, nothing of
# the source once pyarrow has copied it and nothing the pool kept from the tensor before.
# In multiples of one large tensor's bytes (measured now / before this test):
#   write V1 zstd: encoder copy + page + compressed page: 2.6 / 3.8
#   write V1 uncompressed: encoder copy + page: 2.0 / 3.1
#   write int8-row: codes (half the tensor) + pyarrow's three buffers of them: 1.9 / 3.4
#   read V1: decompressed page (or mapped chunk) + decoded value: 1.8 / 2.8 (2.1 uncompressed)
#   read int8-row: codes + float32 result (twice the tensor): 2.2 / 3.9
BIG = (8192, 4096)
BIG_MB = BIG[0] * BIG[1] * 2 / 1e6
CEILINGS = {  # (quant, compression): (write, read)
    (None, "zstd"): (3.0, 2.2),
    (None, "none"): (2.4, 2.2),
    ("int8-row", "zstd"): (2.3, 2.6),
}


@pytest.fixture(scope="module")
def two_large(tmp_path_factory):
    root = tmp_path_factory.mktemp("two-large")
    rng = np.random.default_rng(1)
    small = convcore.cast(rng.standard_normal((256, BIG[1]), dtype=np.float32) * 0.02, "bf16")

    def big():
        for _ in range(BIG[0] // 1024):  # 1024 rows at a time: the test itself stays small
            yield convcore.cast(rng.standard_normal((1024, BIG[1]), dtype=np.float32) * 0.02, "bf16")

    models = {"tiny": [("small.weight", small.shape, lambda: [small])],
              "large": [("embed.weight", BIG, big), ("small.weight", small.shape, lambda: [small]),
                        ("head.weight", BIG, big)]}
    dirs = {}
    for name, planned in models.items():
        path = dirs[name] = root / name
        path.mkdir()
        convcore.write_sharded(path, [convcore.PlannedTensor(n, "bf16", s, f) for n, s, f in planned],
                               max_shard_size=1 << 40)
        (path / "config.json").write_text('{"model_type": "llama"}')
    return root, dirs


# the default tier: the quantized, compressed pair (the float ones in make test-full)
@pytest.mark.parametrize("quant, compression", [pytest.param(*k, marks=() if k[0] else pytest.mark.full)
                                                for k in CEILINGS])
def test_large_tensors_cost_pyarrows_buffers_for_one_value(two_large, registry, quant, compression):
    root, dirs = two_large
    extra = (["--quant", quant] if quant else []) + ["-O", f"compression={compression}"]
    peaks = {}
    for name, src in dirs.items():
        out = root / f"{name}-{quant}-{compression}.parquet"
        peaks[name] = (peak_rss_mb("run", src, "-o", out, "--to", "parquet", *extra, "--no-validate", "-q"),
                       peak_rss_mb("run", out, "-o", root / f"back-{out.stem}", "--to", "hf", "--no-validate", "-q"))
    write, read = ((peaks["large"][i] - peaks["tiny"][i]) / BIG_MB for i in (0, 1))
    print(f"{quant} {compression}: write {write:.2f}, read {read:.2f} x {BIG_MB:.0f} MB over a tiny "
          f"model ({peaks['tiny'][0]:.0f} / {peaks['tiny'][1]:.0f} MB)")
    write_max, read_max = CEILINGS[quant, compression]
    assert write <= write_max and read <= read_max, (write, read)
