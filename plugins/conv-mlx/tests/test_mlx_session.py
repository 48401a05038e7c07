"""The mlx runtime session: mlx-lm loaded once, continuing from its prompt cache."""
from __future__ import annotations

import numpy as np
import pytest

import convcore

pytestmark = pytest.mark.mlx
pytest.importorskip("mlx_lm")


def test_session_continues_from_its_cache_as_a_full_run(tiny_model_factory, tmp_path):
    out = convcore.convert(tiny_model_factory("llama"), tmp_path / "mlx", to="mlx")
    ids = [1, 20, 30, 40, 5, 66, 7, 300]
    with convcore.get_registry().open_session(out) as s:
        full = s.logits(ids)
        head = s.logits(ids[:3])
        tail = np.concatenate([s.decode([t]) for t in ids[3:]])
        generated = list(s.generate(ids, max_tokens=8))
        assert s.vocab_size == 1024 and full.shape == (8, 1024)
    assert s.model is None
    np.testing.assert_allclose(np.concatenate([head, tail]), full, atol=1e-4, rtol=0)
    expected, seq = [], list(ids)
    with convcore.get_registry().open_session(out) as s:
        for _ in range(8):
            expected.append(int(np.argmax(s.logits(seq)[-1])))
            seq.append(expected[-1])
    assert generated == expected


def test_inspect_reports_packed_bytes(run_cli, tiny_model_factory, tmp_path):
    import json

    out = convcore.convert(tiny_model_factory("llama"), tmp_path / "m4", to="mlx", quant="int4-g64")
    info = json.loads(run_cli("inspect", out, "--json").stdout)
    row = info["tensors_by_dtype"]["int4-g64"]
    # 4-bit codes plus an f32 scale and bias per group of 64: 4 + 64/64 bits per weight
    assert row["bytes"] == row["params"] * 4 // 8 + row["params"] // 64 * 2 * 4
    assert sum(r["bytes"] for r in info["tensors_by_dtype"].values()) < info["size_bytes"]
