"""Mixtures of experts through GGUF (Mixtral, Qwen2-MoE with its shared expert,
Qwen3-MoE): experts stacked per layer as llama.cpp's converter stacks them, logits in
llama.cpp against transformers, per-tensor types as llama-quantize picks them (its rules
for 8-expert models included), a stack written an expert at a time, and read back to
the per-expert HF tensors bit for bit."""
from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

import convcore
from convcore import ConvcoreError
from convcore.testing.llamacpp import llama_quantize
from convcore.testing.models import tiny_model
from gguf_testlib import rel_err

T = gguf.GGMLQuantizationType
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
EXPERTS = {"mixtral": 8, "qwen2_moe": 4, "qwen3_moe": 8}
N_TOKENS = 96


@pytest.fixture(scope="module")
def moe_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    cache: dict = {}

    def get(arch: str, quant: str | None = None):
        if (arch, quant) not in cache:
            cache[arch, quant] = convcore.convert(tiny_model(arch), root / f"{arch}-{quant}.gguf",
                                                  to="gguf", quant=quant)
        return cache[arch, quant]
    return get


def _ids(src) -> list[int]:
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    return [int(t) for t in np.random.default_rng(5).integers(3, vocab, size=N_TOKENS)]


def _reference(src, ids, f16: bool = False):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    with torch.no_grad():
        if f16:   # 2-D and 3-D weights as an f16 GGUF stores them; the router stays f32
            for name, p in model.named_parameters():
                if p.ndim >= 2 and not name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                    p.copy_(p.half().float())
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("arch", MOE)
def test_experts_are_stacked_as_llama_cpp_stacks_them(arch, moe_gguf):
    reader = gguf.GGUFReader(moe_gguf(arch, "f16"))
    tensors = {t.name: t for t in reader.tensors}
    n = EXPERTS[arch]
    config = json.loads((tiny_model(arch) / "config.json").read_text())
    ff = config.get("moe_intermediate_size") or config["intermediate_size"]
    hidden = config["hidden_size"]
    for proj, shape in (("gate", (n, ff, hidden)), ("up", (n, ff, hidden)), ("down", (n, hidden, ff))):
        t = tensors[f"blk.1.ffn_{proj}_exps.weight"]
        assert tuple(reversed([int(d) for d in t.shape])) == shape
        assert T(t.tensor_type) == T.F16
    router = tensors["blk.0.ffn_gate_inp.weight"]
    assert T(router.tensor_type) == T.F32   # llama.cpp's converter keeps the router f32
    assert tuple(int(d) for d in router.shape) == (hidden, n)
    fields = reader.fields
    arch_key = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}[arch]
    assert fields[f"{arch_key}.expert_count"].contents() == n
    assert fields[f"{arch_key}.expert_used_count"].contents() == 2
    if arch == "qwen2_moe":
        assert fields["qwen2moe.expert_shared_feed_forward_length"].contents() == 512
        assert T(tensors["blk.0.ffn_gate_inp_shexp.weight"].tensor_type) == T.F32
        assert "blk.0.ffn_down_shexp.weight" in tensors
    # the layer's stacks come after its attention, in llama.cpp's converter's order
    names = [t.name for t in reader.tensors if t.name.startswith("blk.0.")]
    order = {"mixtral": ["gate", "down", "up"]}.get(arch, ["down", "gate", "up"])
    assert [n.split(".")[2] for n in names if "_exps" in n] == [f"ffn_{p}_exps" for p in order]


@pytest.mark.llamacpp
@pytest.mark.parametrize("arch", MOE)
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_moe_logits_in_llamacpp(arch, dtype, moe_gguf):
    src = tiny_model(arch)
    ids = _ids(src)
    ref = _reference(src, ids, f16=dtype == "f16")
    got = convcore.get_registry().infer(moe_gguf(arch, None if dtype == "f32" else dtype), ids, "gguf")
    err = rel_err(got, ref)
    assert err <= (1e-3 if dtype == "f32" else 3e-3), f"{arch} {dtype}: {err:.2e}"


@pytest.mark.llamacpp
@pytest.mark.parametrize("arch,quant", [("mixtral", "q4_k_m"), ("qwen2_moe", "q8_0"),
                                        ("qwen3_moe", "q3_k_m"), ("mixtral", "q2_k")])
def test_moe_types_match_llama_quantize(arch, quant, moe_gguf, tmp_path):
    """Mixtral has 8 experts, for which llama-quantize gives attn_v and attn_k Q8_0 and
    attn_output Q5_K; ffn_down's layer comes from its name. Block types are also
    byte-identical, expert slabs included."""
    ours = moe_gguf(arch, quant)
    theirs = llama_quantize(moe_gguf(arch), tmp_path / "ll.gguf", quant)
    read = {p: {t.name: t for t in gguf.GGUFReader(p).tensors} for p in (ours, theirs)}
    types = {p: {n: T(t.tensor_type) for n, t in ts.items()} for p, ts in read.items()}
    assert types[ours] == types[theirs]
    if arch == "mixtral" and quant == "q4_k_m":
        assert types[ours]["blk.0.attn_k.weight"] == T.Q8_0
        assert types[ours]["blk.1.attn_output.weight"] == T.Q5_K
    if quant == "q8_0":
        for name, t in read[ours].items():
            if T(t.tensor_type) == T.Q8_0:
                assert bytes(t.data) == bytes(read[theirs][name].data), name
    got = convcore.get_registry().infer(ours, _ids(tiny_model(arch))[:32], "gguf")
    assert np.isfinite(got).all()


@pytest.mark.parametrize("arch", MOE)
def test_moe_reads_back_bit_exact(arch, moe_gguf, tmp_path):
    src = tiny_model(arch)
    back = convcore.convert(moe_gguf(arch), tmp_path / "hf", to="hf")
    a, b = load_file(src / "model.safetensors"), load_file(back / "model.safetensors")
    assert set(a) == set(b)
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    ours, theirs = (json.loads((d / "config.json").read_text()) for d in (back, src))
    assert ours["model_type"] == arch
    count = "num_local_experts" if arch == "mixtral" else "num_experts"
    for key in (count, "num_experts_per_tok", "norm_topk_prob", "moe_intermediate_size",
                "shared_expert_intermediate_size"):
        if key in theirs:
            assert ours.get(key) == theirs[key], key


def test_stacks_are_written_an_expert_at_a_time(tmp_path):
    from conv_gguf import writer
    model = convcore.load(tiny_model("mixtral"))
    _, planned, _ = writer.plan(model, {})
    stack = next(p for p in planned if p.name == "blk.0.ffn_down_exps.weight")
    assert len(stack.parts) == 8
    parts = [s for s in writer.slices(planned) if s.item is stack]
    per = stack.shape[1]
    assert all(s.start // per == (s.stop - 1) // per for s in parts)   # never across experts
    joined = np.concatenate([writer.produce(s) for s in parts])
    expected = np.stack([model.tensors[f"model.layers.0.block_sparse_moe.experts.{x}.w2.weight"].load()
                         for x in range(8)]).reshape(-1, stack.shape[-1])
    assert np.array_equal(joined, expected)


def _edited(tmp_path, arch, **changes):
    src = tmp_path / "src"
    shutil.copytree(tiny_model(arch), src)
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (src / "config.json").write_text(json.dumps(config))
    return src


def test_moe_routing_llama_cpp_cannot_run_is_refused(tmp_path):
    src = _edited(tmp_path, "qwen3_moe", norm_topk_prob=False)
    with pytest.raises(ConvcoreError, match="norm_topk_prob=False"):
        convcore.convert(src, tmp_path / "x.gguf", to="gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_moe_missing_expert_is_one_line(tmp_path):
    src = _edited(tmp_path, "mixtral", num_local_experts=9)
    with pytest.raises(ConvcoreError, match=r"expected 9 \(missing \[8\]\)"):
        convcore.convert(src, tmp_path / "x.gguf", to="gguf")


def test_llamacpp_mixtral_gguf_inspects(moe_gguf, run_cli):
    """A Mixtral GGUF as llama.cpp's converter writes it (architecture llama, expert
    tensors) inspects and reads as mixtral."""
    result = run_cli("inspect", moe_gguf("mixtral"), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["arch"] == "mixtral"


def test_unknown_architecture_inspects_but_does_not_convert(tmp_path, run_cli):
    """A GGUF of an architecture conv-gguf cannot map (here mamba) shows its header
    and tensors in ``inspect``; ``run`` refuses it in one line and writes nothing."""
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(path, "mamba")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_tensor("token_embd.weight", np.ones((8, 32), np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.ones((32, 32), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    shown = run_cli("inspect", path, "--json")
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["arch"] == "mamba" and info["tensors"] == 2 and info["params"] == 8 * 32 + 32 * 32
    refused = run_cli("run", path, "-o", tmp_path / "hf", "--to", "hf")
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines()[-1].startswith(f"error: {path}: GGUF architecture 'mamba'")
    assert "can be inspected, not converted" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "hf").exists()
