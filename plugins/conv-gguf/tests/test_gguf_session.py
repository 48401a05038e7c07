"""The gguf runtime session: llama.cpp loaded once, continuing from its KV cache."""
from __future__ import annotations

import numpy as np
import pytest

import convcore

pytestmark = pytest.mark.llamacpp
pytest.importorskip("llama_cpp")


def test_session_continues_from_its_cache_as_a_full_run(converted):
    """Logits of a prefix then one token at a time equal the logits of the whole
    sequence (same runtime, f32 KV cache), and greedy generation follows them."""
    path = converted("llama", "f32")
    ids = [1, 20, 30, 40, 5, 66, 7, 300]
    with convcore.get_registry().open_session(path, options={"n_ctx": 64}) as s:
        full = s.logits(ids)
        head = s.logits(ids[:3])
        tail = np.concatenate([s.decode([t]) for t in ids[3:]])
        assert s.vocab_size == full.shape[1] == 1024 and s.stop_ids == (2,)
        generated = list(s.generate(ids, max_tokens=10))
        with pytest.raises(convcore.ConvcoreError, match="outside the vocabulary of 1024"):
            s.logits([1, 5000])
    np.testing.assert_allclose(np.concatenate([head, tail]), full, atol=1e-4, rtol=0)
    # greedy by hand: one full run per step, no cache
    expected, seq = [], list(ids)
    for _ in range(10):
        with convcore.get_registry().open_session(path, options={"n_ctx": 64}) as s:
            expected.append(int(np.argmax(s.logits(seq)[-1])))
        seq.append(expected[-1])
    assert generated == expected


def test_session_refuses_more_than_its_context(converted):
    path = converted("llama", "f32")
    with convcore.get_registry().open_session(path, options={"n_ctx": 64}) as s:
        s.logits(list(range(1, 60)))
        with pytest.raises(convcore.ConvcoreError, match="exceed the session's context of 64"):
            s.decode(list(range(1, 10)))


def test_infer_cli_generates_with_one_load(run_cli, converted):
    path = converted("llama", "q8_0")
    r = run_cli("infer", path, "--tokens", "1,20,30,40", "--max-tokens", "8", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    ids = [int(t) for t in r.stdout.strip().split(",")]
    assert len(ids) == 8
    with convcore.get_registry().open_session(path) as s:
        assert list(s.generate([1, 20, 30, 40], 8)) == ids


@pytest.mark.full
def test_compare_pairs_tensors_and_shows_gguf_names(run_cli, converted, tiny_model_factory):
    """``compare --tensors`` runs both models in their runtimes and pairs weights by HF
    name, showing each under its GGUF name (from ``convcore_map_names``)."""
    import json

    src = tiny_model_factory("llama")
    r = run_cli("compare", src, converted("llama", "q8_0"), "--tensors", "--json", "--limit", "256")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["candidate_names"]["model.layers.0.mlp.down_proj.weight"] == "blk.0.ffn_down.weight"
    assert report["tensors"]["model.norm.weight"] == 0.0          # norms stay f32
    assert 0 < report["tensors"]["model.layers.0.mlp.down_proj.weight"] < 0.01   # q8_0
    assert report["top1_agreement"] > 0.8 and report["kl_mean"] < 0.01
    text = run_cli("compare", src, converted("llama", "q8_0"), "--tensors", "--limit", "256").stdout
    assert "model.layers.0.mlp.down_proj.weight (blk.0.ffn_down.weight): " in text


def test_infer_is_quiet_unless_verbose(run_cli, tiny_model_factory, tmp_path):
    """llama.cpp's own log (here gemma2's sliding-window cache notice) stays off stderr."""
    path = convcore.convert(tiny_model_factory("gemma2"), tmp_path / "g2.gguf", to="gguf",
                            quant="q8_0")
    quiet = run_cli("infer", path, "--tokens", "1,2,3")
    assert quiet.returncode == 0 and quiet.stderr == ""
    loud = run_cli("infer", path, "--tokens", "1,2,3", "--verbose")
    assert loud.returncode == 0 and "llama" in loud.stderr


def test_inspect_reports_stored_bytes_and_file_size(run_cli, converted):
    import json

    path = converted("llama", "q8_0")
    info = json.loads(run_cli("inspect", path, "--json").stdout)
    assert info["size_bytes"] == path.stat().st_size
    q8 = info["tensors_by_dtype"]["q8_0"]
    assert q8["bytes"] == q8["params"] // 32 * 34   # ggml's q8_0 block: 34 bytes per 32
    total = sum(row["bytes"] for row in info["tensors_by_dtype"].values())
    assert 0.9 * info["size_bytes"] < total <= info["size_bytes"]
