"""Memory on the paths where the largest tensor decides the peak (the 400 MB ceiling of the
1.1B model is measured by the benches): a model whose
embedding and lm_head are TinyLlama-1.1B's (32000 x 2048, 131 MB each in bf16) and one
small layer. The 1.1B bench model's figures are in docs/benchmarks.md; these guard the
mechanisms behind them (measured in a child, by the kernel's count):

- gguf (q4_k_m) -> hf f16: k-quant tensors dequantize straight to f16 (no float32 copy,
  262 MB for the embedding) from a few MB of the file's blocks at a time;
- hf -> mlx int4-g64: the source's pages leave the resident set as rows are quantized;
- hf -> hf, a copy and a cast: pieces cast as they are written, the source's pages
  dropped behind (docs/benchmarks.md, "Flat memory", measures a 2.15 GB tensor).

Each test compares the peak with the same conversion of a model whose embedding and
lm_head have 4096 rows instead of 32000, so what the process and its libraries hold (which
varies with what else maps the same files) cancels out: the difference is what the two
large tensors cost.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import convcore
from convcore.testing.memory import peak_rss_mb
from convcore.testing.models import spm_tokenizer

pytestmark = pytest.mark.slow
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 512, "num_hidden_layers": 1, "num_attention_heads": 32,
    "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
}
SHAPES = {"model.embed_tokens.weight": (32000, 2048), "lm_head.weight": (32000, 2048),
          "model.norm.weight": (2048,), "model.layers.0.input_layernorm.weight": (2048,),
          "model.layers.0.post_attention_layernorm.weight": (2048,),
          "model.layers.0.self_attn.q_proj.weight": (2048, 2048),
          "model.layers.0.self_attn.k_proj.weight": (256, 2048),
          "model.layers.0.self_attn.v_proj.weight": (256, 2048),
          "model.layers.0.self_attn.o_proj.weight": (2048, 2048),
          "model.layers.0.mlp.gate_proj.weight": (512, 2048),
          "model.layers.0.mlp.up_proj.weight": (512, 2048),
          "model.layers.0.mlp.down_proj.weight": (2048, 512)}


def make_model(root, vocab: int):
    src = root / f"hf-{vocab}"
    src.mkdir()
    rng = np.random.default_rng(0)

    def produce(shape):
        def make():
            x = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
            return convcore.cast(x + (1.0 if len(shape) == 1 else 0.0), "bf16")
        return make

    shapes = {n: ((vocab, s[1]) if s[0] == 32000 else s) for n, s in SHAPES.items()}
    convcore.write_sharded(src, [convcore.PlannedTensor(n, "bf16", s, produce(s))
                                 for n, s in shapes.items()], max_shard_size=1 << 40)
    (src / "config.json").write_text(json.dumps({**CONFIG, "vocab_size": vocab}))
    spm_tokenizer(src)
    return src


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    return root, make_model(root, 32000), make_model(root, 4096)


def test_gguf_q4_k_m_to_hf_f16_stays_under_the_ceiling(wide):
    """Streamed, the two 32000-row tensors cost about 1 MB more than 4096-row ones (the
    peak is elsewhere); as whole f16 tensors (the path before) 113 MB; held to 90."""
    root, src, small = wide
    peaks = []
    for model in (src, small):
        gguf_file = convcore.convert(model, root / f"{model.name}.gguf", to="gguf", quant="q4_k_m")
        peaks.append(peak_rss_mb("run", gguf_file, "-o", root / f"back-{model.name}", "--to", "hf",
                                 "--dtype", "f16", "--no-validate", "-q"))
    print(f"gguf q4_k_m -> hf f16: {peaks[0]:.0f} MB, small model {peaks[1]:.0f} MB")
    assert peaks[0] - peaks[1] < 90
    back = convcore.load(root / f"back-{src.name}").tensors["model.embed_tokens.weight"]
    assert back.dtype == "f16" and back.shape == (32000, 2048)


def test_hf_to_mlx_int4_stays_under_the_ceiling(wide):
    """On one thread, so the peak does not depend on how far conv-mlx's read-ahead gets.
    With the source's pages released as rows are quantized, the two large tensors cost
    about 42 MB over small ones; holding their pages to the end (the path before) 150 MB;
    held to 100."""
    root, src, small = wide
    peaks = [peak_rss_mb("run", model, "-o", root / f"mlx-{model.name}", "--to", "mlx",
                         "--quant", "int4-g64", "--no-validate", "-q", "--jobs", "1")
             for model in (src, small)]
    print(f"hf -> mlx int4-g64: {peaks[0]:.0f} MB, small model {peaks[1]:.0f} MB")
    assert peaks[0] - peaks[1] < 100


def test_hf_to_hf_casts_and_copies_stay_under_the_ceiling(wide):
    """The hf writer streams every tensor: cast a piece at a time (bf16 -> f32: whole,
    the two 32000-row tensors were 524 MB of f32 and their source pages 262 MB more) and
    the source's mapped pages dropped behind the pass (a plain copy held them all).
    Streamed, they cost a few MB over 4096-row ones; held to 60. The f32 copy is the
    bf16 source widened exactly."""
    root, src, small = wide
    for args in ((), ("--dtype", "f32")):
        tag = "-".join(args) or "copy"
        peaks = [peak_rss_mb("run", model, "-o", root / f"hf-{tag}-{model.name}", "--to", "hf", *args,
                             "--no-validate", "-q") for model in (src, small)]
        print(f"hf -> hf {tag}: {peaks[0]:.0f} MB, small model {peaks[1]:.0f} MB")
        assert peaks[0] - peaks[1] < 60, (tag, peaks)
    want = convcore.load(src).tensors["model.embed_tokens.weight"].load()
    got = convcore.load(root / f"hf---dtype-f32-{src.name}").tensors["model.embed_tokens.weight"].load()
    assert got.dtype == np.float32 and np.array_equal(got, convcore.cast(want, "f32"))
