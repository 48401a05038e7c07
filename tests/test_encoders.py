"""Encoders (sentence-embedding models) in the runtimes: sessions pool as the model's
sentence-transformers files say, infer prints an embedding (never LM logits), compare
reports cosine similarity; no runtime runs a newly initialised head."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import convcore
from convcore import fidelity
from convcore.testing.models import tiny_encoder

SENTENCES = ["The ferry left the island at dawn.", "Bread rises because yeast makes gas.",
             "Fix the puncture, then check the tyre pressure.", "numbers like 3.5 and 42%"]


def reference_embeddings(src: Path) -> np.ndarray:
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(str(src), device="cpu").encode(SENTENCES, convert_to_numpy=True)


def session_embeddings(path: Path) -> np.ndarray:
    tok = fidelity.tokenizer_for(convcore.load(path))
    with convcore.get_registry().open_session(path) as s:
        assert s.kind == "encoder"
        return np.stack([s.embed(tok(t).input_ids) for t in SENTENCES])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_hf_session_pools_as_sentence_transformers(pooling: str) -> None:
    src = tiny_encoder(pooling=pooling)
    got, want = session_embeddings(src), reference_embeddings(src)
    assert cosines(got, want).min() >= 0.99999
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # the Normalize module
    assert np.abs(got - want).max() <= 1e-5


@pytest.mark.full
@pytest.mark.onnx
@pytest.mark.slow
def test_onnx_export_of_an_encoder_embeds_as_the_source(tmp_path: Path, run_cli) -> None:
    src = tiny_encoder()
    out = tmp_path / "onnx"
    convcore.convert(src, out, to="onnx")
    assert cosines(session_embeddings(out), reference_embeddings(src)).min() >= 0.9999
    res = run_cli("compare", src, out, "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["kind"] == "encoder" and report["cosine_min"] >= 0.9999
    assert report["hidden_max_abs_diff"] <= 1e-4


@pytest.mark.full
def test_infer_prints_an_embedding_never_logits(tmp_path: Path, run_cli) -> None:
    src = tiny_encoder()
    npy = tmp_path / "e.npy"
    res = run_cli("infer", src, "--prompt", SENTENCES[0], "--embedding", npy)
    assert res.returncode == 0, res.stderr
    shown = json.loads(res.stdout)
    assert shown["kind"] == "encoder" and shown["dim"] == 256 and "top5_next" not in shown
    saved = np.load(npy)
    assert saved.shape == (256,) and abs(float(np.linalg.norm(saved)) - shown["norm"]) < 1e-4
    assert abs(shown["norm"] - 1.0) < 1e-5
    res = run_cli("infer", src, "--prompt", "hello", "--max-tokens", "5")
    assert res.returncode == 1 and "embedding model" in res.stderr and res.stderr.count("\n") == 1


def test_a_task_checkpoint_runs_its_base_model_only(tmp_path: Path) -> None:
    """A BertForMaskedLM checkpoint (no pooler weights) opens as an encoder: the base model
    with the checkpoint's own weights; nothing newly initialised runs."""
    import torch
    import transformers
    config = json.loads((tiny_encoder() / "config.json").read_text())
    config.pop("architectures", None)
    cfg = transformers.BertConfig(**{k: v for k, v in config.items() if k not in ("transformers_version",)})
    torch.manual_seed(3)
    mlm = transformers.BertForMaskedLM(cfg).eval()
    mlm.save_pretrained(tmp_path / "mlm")
    with convcore.get_registry().open_session(tmp_path / "mlm") as s:
        assert s.kind == "encoder"
        got = s.hidden_states([2, 50, 60, 3])
    with torch.no_grad():
        want = mlm.bert(torch.tensor([[2, 50, 60, 3]])).last_hidden_state[0].numpy()
    assert np.abs(got - want).max() <= 1e-5


@pytest.mark.llamacpp
@pytest.mark.parametrize("quant,floor", [("f16", 0.999), pytest.param("q8_0", 0.99, marks=pytest.mark.full)])
def test_gguf_encoder_compare_and_infer(quant: str, floor: float, tmp_path: Path, run_cli) -> None:
    src = tiny_encoder()
    out = tmp_path / f"e-{quant}.gguf"
    convcore.convert(src, out, to="gguf", quant=quant)
    res = run_cli("compare", src, out, "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["kind"] == "encoder" and report["sentences"] == 16
    assert report["cosine_min"] >= floor
    res = run_cli("infer", out, "--prompt", SENTENCES[1])
    assert res.returncode == 0 and json.loads(res.stdout)["dim"] == 256
