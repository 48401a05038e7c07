"""LoRA adapters: PEFT folders to llama.cpp's adapter GGUF and mlx-lm adapter folders, or
merged into any format as the weights stream; each checked in its runtime against
transformers + PEFT applying the same adapter."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import convcore
from convcore.testing.adapters import peft_logits, tiny_lora
from convcore.testing.models import reference_logits, tiny_model

IDS = [1, 5, 9, 20, 33, 7, 2, 50, 101, 13, 77, 4]
FAMILIES = ("llama", "qwen2", "gemma", "qwen2_moe")
#: transformers keeps a MoE layer's experts as stacked parameters, which PEFT's LoRA does not
#: target: the MoE base's adapter is on attention
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def llamacpp_logits(model: Path, ids: list[int], lora: Path | None = None, scale: float = 1.0) -> np.ndarray:
    with convcore.get_registry().open_session(model, "gguf", {"n_ctx": 64, "lora": [(lora, scale)] if lora else []}) as s:
        return np.asarray(s.logits(ids), np.float64)


@pytest.fixture(scope="module")
def base_gguf(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            out = tmp_path_factory.mktemp(f"base-{family}") / "base.gguf"
            convcore.convert(tiny_model(family), out, "gguf", dtype="f32")
            made[family] = out
        return made[family]
    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_gguf_in_llamacpp_and_merge_match_peft(family: str, tmp_path: Path, base_gguf) -> None:
    base = tiny_model(family)
    # Gemma's scaled embeddings make its logits larger: a larger B moves them as much
    adapter = (tiny_lora(base, b_scale=0.08) if family == "gemma" else
               tiny_lora(base, targets=ATTENTION) if family == "qwen2_moe" else tiny_lora(base))
    reference = peft_logits(base, adapter, IDS)
    plain = llamacpp_logits(base_gguf(family), IDS)
    assert rel(plain, reference) > 0.05   # the adapter changes the model: a dropped one shows
    out = tmp_path / "adapter.gguf"
    convcore.convert(adapter, out, "gguf")
    kv = {f.name: f for f in __import__("gguf").GGUFReader(str(out)).fields.values()}
    assert bytes(kv["general.type"].parts[-1]).decode() == "adapter"
    assert bytes(kv["adapter.type"].parts[-1]).decode() == "lora"
    assert float(kv["adapter.lora.alpha"].parts[-1][0]) == 16.0
    assert rel(llamacpp_logits(base_gguf(family), IDS, out), reference) <= 3e-3
    merged = tmp_path / "merged"
    convcore.convert(base, merged, "hf", loras=[str(adapter)])
    assert rel(reference_logits(merged, IDS), reference) <= 1e-5


def test_merged_gguf_f16_and_infer_lora_print_the_merged_text(tmp_path: Path, run_cli, base_gguf) -> None:
    base = tiny_model("llama")
    adapter = tiny_lora(base)
    reference = peft_logits(base, adapter, IDS)
    merged = tmp_path / "merged.gguf"
    r = run_cli("run", base, "--to", "gguf", "--dtype", "f16", "--lora", adapter, "-o", merged, "-q")
    assert r.returncode == 0, r.stderr
    assert rel(llamacpp_logits(merged, IDS), reference) <= 3e-3
    ad = tmp_path / "adapter.gguf"
    assert run_cli("run", adapter, "--to", "gguf", "--base", base, "-o", ad, "-q").returncode == 0
    tokens = ",".join(map(str, IDS[:6]))
    with_lora = run_cli("infer", base_gguf("llama"), "--tokens", tokens, "--max-tokens", "12", "--lora", ad)
    merged_text = run_cli("infer", tmp_path / "merged.gguf", "--tokens", tokens, "--max-tokens", "12")
    plain = run_cli("infer", base_gguf("llama"), "--tokens", tokens, "--max-tokens", "12")
    assert with_lora.returncode == 0, with_lora.stderr
    assert with_lora.stdout == merged_text.stdout != plain.stdout


def test_mlx_adapter_in_mlx_lm_matches_peft(tmp_path: Path, base_gguf) -> None:
    pytest.importorskip("mlx_lm")
    import mlx.core as mx
    from mlx_lm import load

    base = tiny_model("llama")
    adapter = tiny_lora(base)
    reference = peft_logits(base, adapter, IDS)
    base_mlx, ad = tmp_path / "base-mlx", tmp_path / "ad-mlx"
    convcore.convert(base, base_mlx, "mlx", dtype="f32")
    convcore.convert(adapter, ad, "mlx")
    config = json.loads((ad / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["lora_parameters"]["scale"] == 2.0
    model, _ = load(str(base_mlx), adapter_path=str(ad))
    got = np.array(model(mx.array([IDS]))[0].astype(mx.float32))
    assert rel(got, reference) <= 1e-3
    # and back: the mlx-lm adapter folder as a source gives llama.cpp the same adapter
    back = tmp_path / "from-mlx.gguf"
    convcore.convert(ad, back, "gguf", base=base)
    assert rel(llamacpp_logits(base_gguf("llama"), IDS, back), reference) <= 3e-3


def test_rslora_and_per_module_patterns_are_honoured(tmp_path: Path, base_gguf) -> None:
    """rsLoRA's alpha/sqrt(r), a smaller rank for q_proj and another alpha for down_proj:
    llama.cpp's one alpha/r and mlx-lm's one rank and scale still compute PEFT's model."""
    pytest.importorskip("mlx_lm")
    import mlx.core as mx
    from mlx_lm import load

    base = tiny_model("llama")
    adapter = tiny_lora(base, use_rslora=True, rank_pattern={"q_proj": 4}, alpha_pattern={"down_proj": 40})
    reference = peft_logits(base, adapter, IDS)
    out = tmp_path / "adapter.gguf"
    convcore.convert(adapter, out, "gguf")
    assert rel(llamacpp_logits(base_gguf("llama"), IDS, out), reference) <= 3e-3
    merged = tmp_path / "merged"
    convcore.convert(base, merged, "hf", loras=[str(adapter)])
    assert rel(reference_logits(merged, IDS), reference) <= 1e-5
    base_mlx, ad = tmp_path / "base-mlx", tmp_path / "ad-mlx"
    convcore.convert(base, base_mlx, "mlx", dtype="f32")
    convcore.convert(adapter, ad, "mlx")
    model, _ = load(str(base_mlx), adapter_path=str(ad))
    assert rel(np.array(model(mx.array([IDS]))[0].astype(mx.float32)), reference) <= 1e-3


def test_q8_0_adapter_types(tmp_path: Path, base_gguf) -> None:
    """q8_0 where a row is whole 32-value blocks (lora_a: the input width), f16 for
    lora_b's rank-wide rows, as llama.cpp's converter falls back; llama.cpp runs it."""
    import gguf

    base = tiny_model("llama")
    adapter = tiny_lora(base)
    out = tmp_path / "adapter.gguf"
    convcore.convert(adapter, out, "gguf", quant="q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.0.attn_q.weight.lora_a"] == "Q8_0"
    assert types["blk.0.attn_q.weight.lora_b"] == "F16"
    assert len(types) == 2 * 7 * 2
    reference = peft_logits(base, adapter, IDS)
    # q8_0's rounding of A moves the logits a little; the base alone is far off
    assert rel(llamacpp_logits(base_gguf("llama"), IDS, out), reference) <= 1e-2
    assert convcore.get_registry().validate(out, "gguf") == []
    with pytest.raises(convcore.ConvcoreError, match="a LoRA adapter for llama .*apply it with --lora"):
        convcore.convert(out, tmp_path / "back", "hf")
    # a model GGUF where an adapter is expected is one line, never the base run silently
    with pytest.raises(convcore.ConvcoreError, match="not a LoRA adapter GGUF"):
        llamacpp_logits(base_gguf("llama"), IDS, base_gguf("llama"))


def test_hf_runtime_applies_peft_and_scales(tmp_path: Path, run_cli) -> None:
    base = tiny_model("llama")
    adapter = tiny_lora(base)
    half = tmp_path / "half"
    convcore.convert(base, half, "hf", loras=[f"{adapter}:0.5"])
    r = run_cli("compare", half, base, "--tokens", ",".join(map(str, IDS)), "--json", "--lora", f"{adapter}:0.5")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["top1_agreement"] == 1.0 and report["max_abs_diff"] < 1e-4
    # without the adapter the base differs from the merge
    assert np.abs(reference_logits(half, IDS) - reference_logits(base, IDS)).max() > 1e-2


def _broken(tmp_path: Path, adapter: Path, **config) -> Path:
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    data = json.loads((copy / "adapter_config.json").read_text())
    data.update(config)
    (copy / "adapter_config.json").write_text(json.dumps(data))
    return copy


@pytest.mark.parametrize("case", ["wrong base", "no base", "ia3", "fan_in_fan_out", "embedding to gguf", "to hf"])
def test_bad_adapters_are_one_line(case: str, tmp_path: Path, run_cli) -> None:
    base = tiny_model("llama")
    adapter = tiny_lora(base)
    to, extra = "gguf", []
    if case == "wrong base":
        extra, expect = ["--base", tiny_model("llama", hidden=128, heads=2, kv_heads=1)], "does not fit the base"
    elif case == "no base":
        adapter, expect = _broken(tmp_path, adapter, base_model_name_or_path="/no/such/base"), "pass --base BASE"
    elif case == "ia3":
        adapter, expect = _broken(tmp_path, adapter, peft_type="IA3"), "only LoRA adapters convert"
    elif case == "fan_in_fan_out":
        adapter, expect = _broken(tmp_path, adapter, fan_in_fan_out=True), "fan_in_fan_out adapters"
    elif case == "embedding to gguf":
        adapter = tiny_lora(base, modules_to_save=["lm_head"])
        expect = "merge it instead"
    else:
        to, expect = "hf", "cannot store one"
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run_cli("run", adapter, "--to", to, "-o", tmp_path / "out", *extra)
    assert r.returncode == 1
    assert expect in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_modules_to_save_merge_replaces_the_weight(tmp_path: Path) -> None:
    base = tiny_model("llama")
    adapter = tiny_lora(base, modules_to_save=["lm_head"])
    reference = peft_logits(base, adapter, IDS)
    merged = tmp_path / "merged"
    convcore.convert(base, merged, "hf", loras=[str(adapter)])
    assert rel(reference_logits(merged, IDS), reference) <= 1e-5
