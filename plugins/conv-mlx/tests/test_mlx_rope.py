"""Rope scaling in MLX: mlx-lm reads ``rope_theta`` / ``rope_scaling`` (and Gemma-3's
local base and layer pattern), which transformers 5 no longer writes; without them
mlx-lm silently runs plain rope. Checked in mlx-lm on 200 tokens, past the original
context, against transformers; ``run --check`` catches the defect if it comes back."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import convcore
from convcore.cli import cli
from convcore.testing.models import ROPE_VARIANTS, reference_logits, rope_model
from mlx_helpers import config, mlx_logits

N_TOKENS = 200


def _source(variant: str):
    return rope_model(variant)


def _reference(src, ids):
    return reference_logits(src, ids)


@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
def test_scaled_rope_runs_right_in_mlx_lm(variant, tmp_path):
    src = _source(variant)
    out = convcore.convert(src, tmp_path / "mlx", to="mlx")
    cfg = config(out)
    rope = ROPE_VARIANTS[variant]["rope_parameters"]
    assert cfg["rope_theta"] == rope["rope_theta"]
    assert cfg["rope_scaling"]["rope_type"] == variant
    vocab = cfg["vocab_size"]
    ids = [int(t) for t in np.random.default_rng(2).integers(3, vocab, size=N_TOKENS)]
    ref = _reference(src, ids)
    got = mlx_logits(out, ids)
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    assert err <= 1e-3, f"{variant}: mlx-lm vs transformers: {err:.2e}"


def test_check_flags_rope_mlx_lm_cannot_see(tmp_path, monkeypatch):
    """With the config keys mlx-lm reads left out (the defect this writer had, and
    mlx_lm.convert has), ``run --check`` fails with exit status 3; with them it passes at
    the f32 default tolerance, which it finds without --dtype."""
    src = _source("llama3")
    runner = CliRunner()
    ok = runner.invoke(cli, ["run", str(src), "-o", str(tmp_path / "good"), "--to", "mlx",
                             "--check", "--check-tokens", "512"])
    assert ok.exit_code == 0, ok.output
    assert "check passed" in ok.output
    import conv_mlx.writer
    monkeypatch.setattr(conv_mlx.writer, "mlx_keys", lambda *a, **k: {})
    bad = runner.invoke(cli, ["run", str(src), "-o", str(tmp_path / "bad"), "--to", "mlx",
                              "--check", "--check-tokens", "512"])
    assert "rope_scaling" not in json.loads((tmp_path / "bad" / "config.json").read_text())
    assert bad.exit_code == 3, bad.output
    assert "beyond tolerance" in bad.output


def test_yarn_explicit_attention_factor_in_mlx_lm(tmp_path):
    """transformers scales YaRN's cos/sin by an explicit attention_factor alone; mlx-lm
    derives its scale from mscale / mscale_all_dim, which are set to give the same."""
    import shutil
    src = tmp_path / "src"
    shutil.copytree(_source("yarn"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_parameters"]["attention_factor"] = 1.0
    (src / "config.json").write_text(json.dumps(cfg))
    out = convcore.convert(src, tmp_path / "mlx", to="mlx")
    assert config(out)["rope_scaling"]["mscale"] == 0.0
    ids = [int(t) for t in np.random.default_rng(2).integers(3, cfg["vocab_size"], size=N_TOKENS)]
    ref = _reference(src, ids)
    err = float(np.abs(mlx_logits(out, ids) - ref).max() / np.abs(ref).max())
    assert err <= 1e-3, f"mlx-lm vs transformers: {err:.2e}"
