"""Runtime session: the file rebuilt as the transformers model it came from, logits
through the hf session, the temporary directory gone after close."""
from __future__ import annotations

import tempfile

import numpy as np
import pytest

import convcore

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # each loads a transformers model


def test_session_logits_equal_the_source_model(tiny_llama, tmp_path, registry, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = convcore.convert(tiny_llama, tmp_path / "m.parquet", to="parquet")
    ids = [1, 5, 9, 200, 17]
    with registry.open_session(tiny_llama, "hf") as ref:
        want = ref.logits(ids)
        want_next = ref.decode([3])
    with registry.open_session(out) as session:
        assert len(list(scratch.glob("convcore-parquet-*"))) == 1  # the temporary HF directory
        assert session.vocab_size == 1024 and session.stop_ids == ref.stop_ids
        got = session.logits(ids)
        assert np.array_equal(got, want)  # the same weights, bit for bit
        assert np.array_equal(session.decode([3]), want_next)
        assert len(list(session.generate(ids, max_tokens=4))) == 4
    assert list(scratch.glob("convcore-parquet-*")) == []
    with pytest.raises(convcore.ConvcoreError, match="session is closed"):
        session.logits(ids)
    assert np.array_equal(registry.infer(out, ids), want)  # the one-shot hook, from the session


def test_infer_a_quantized_file(run_cli, tiny_llama, tmp_path, registry):
    out = convcore.convert(tiny_llama, tmp_path / "q.parquet", to="parquet", quant="int8-row")
    logits = tmp_path / "logits.npy"
    r = run_cli("infer", out, "--tokens", "1,2,3,4", "--logits", logits)
    assert r.returncode == 0, r.stderr
    got = np.load(logits)
    with registry.open_session(tiny_llama, "hf") as ref:
        want = ref.logits([1, 2, 3, 4])
    assert got.shape == want.shape
    assert (got.argmax(-1) == want.argmax(-1)).all()  # int8 per row keeps the top token
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_infer_a_plain_file_says_what_is_missing(run_cli, tmp_path):
    from parquet_helpers import plain_v1
    plain = plain_v1(tmp_path / "plain.parquet", {"w": np.ones((4, 8), np.float32)})
    r = run_cli("infer", plain, "--tokens", "1,2")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "has no config.json in its metadata, and format hf needs the model's config" in r.stderr
