"""A tensor over 2 GiB (what one Parquet value cannot hold): a one-layer llama with a
131072 x 4096 f32 embedding (2 GiB) converts to Parquet as 16 MiB chunks (the default chunk_size) and back to HF
bit for bit, and duckdb puts the embedding together from the file with one query.

duckdb has no aggregate that joins BLOBs (string_agg turns them into escaped text, about
3x larger and over its 4 GiB string limit here), so the query folds a list of the chunks
with ``||`` (list_reduce): duckdb then holds about 8x the tensor (17 GB and 80-100 s
here, with chunks of 64 MiB or of 1 GB alike), so this test needs about 20 GB of memory.

Takes about 5 GB of disk and 3-4 minutes; peak RSS of each step is printed."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

import convcore
from parquet_helpers import peak_rss_mb

pytestmark = pytest.mark.full
VOCAB, HIDDEN, FFN = 131072, 4096, 256
EMBED = "model.embed_tokens.weight"
BLOCK = 4096  # rows made (and hashed) at a time: 64 MiB
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
          "intermediate_size": FFN, "num_hidden_layers": 1, "num_attention_heads": 32,
          "num_key_value_heads": 8, "vocab_size": VOCAB, "max_position_embeddings": 512,
          "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "torch_dtype": "float32",
          "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}


def _shapes() -> dict[str, tuple[int, ...]]:
    kv = HIDDEN // 32 * 8
    p = "model.layers.0."
    return {EMBED: (VOCAB, HIDDEN), p + "input_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (kv, HIDDEN),
            p + "self_attn.v_proj.weight": (kv, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "post_attention_layernorm.weight": (HIDDEN,), p + "mlp.gate_proj.weight": (FFN, HIDDEN),
            p + "mlp.up_proj.weight": (FFN, HIDDEN), p + "mlp.down_proj.weight": (HIDDEN, FFN),
            "model.norm.weight": (HIDDEN,)}


QUERY = """
import duckdb, sys
duckdb.sql("SET enable_progress_bar = false")
print(duckdb.sql(f"SELECT sha256(list_reduce(list(data ORDER BY chunk), lambda a, b: a || b)) "
                 f"FROM '{sys.argv[1]}' WHERE layer_name = '{sys.argv[2]}'").fetchall()[0][0])
"""
LAUNCHER = """
import resource, subprocess, sys
out = subprocess.run(sys.argv[1:], capture_output=True, text=True, check=True).stdout.strip()
print(out, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def _duckdb_sha256(path, name) -> tuple[str, float]:
    """(sha256 of tensor ``name`` as duckdb puts it together, the query's peak RSS in MiB)."""
    r = subprocess.run([sys.executable, "-c", LAUNCHER, sys.executable, "-c", QUERY, str(path), name],
                       capture_output=True, text=True, check=True)
    digest, kib = r.stdout.split()
    return digest, int(kib) / 1024


def _digests(path) -> dict[str, str]:
    """{name: sha256 of the tensor's bytes}, hashed a block of rows at a time."""
    out = {}
    for name, ref in convcore.load(path).tensors.items():
        h = hashlib.sha256()
        for piece in ref.load_chunks():
            h.update(np.ascontiguousarray(piece).view(np.uint8))
        out[name] = h.hexdigest()
    return out


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)

    def produce(shape):
        def make():
            for a in range(0, shape[0], BLOCK):
                rows = (min(BLOCK, shape[0] - a),) + shape[1:]
                yield rng.standard_normal(rows, dtype=np.float32) * 0.02
        return make

    src = root / "src"
    src.mkdir()
    convcore.write_sharded(src, [convcore.PlannedTensor(n, "f32", s, produce(s)) for n, s in _shapes().items()],
                           max_shard_size=1 << 40)
    (src / "config.json").write_text(json.dumps(CONFIG))
    return root, src


def test_a_two_gib_tensor_goes_to_parquet_and_back_bit_exact(big_model, registry):
    pytest.importorskip("duckdb")
    root, src = big_model
    out, back = root / "m.parquet", root / "back"
    write = peak_rss_mb("run", src, "-o", out, "--to", "parquet", "--no-validate", "-q")
    read = peak_rss_mb("run", out, "-o", back, "--to", "hf", "--no-validate", "-q")
    print(f"2 GiB f32 embedding: write peak {write:.0f} MiB, read peak {read:.0f} MiB")
    meta = pq.read_metadata(out)
    # 16 MiB chunks: 128 of the embedding, 4 each of q_proj and o_proj (64 MiB); k_proj and
    # v_proj are exactly 16 MiB, so one row each, as are the other 6 tensors
    assert meta.num_row_groups == meta.num_rows == 128 + 4 + 4 + 8
    want = _digests(src)
    assert _digests(back) == want
    assert write < 400 and read < 400, (write, read)  # a few 16 MiB chunks, not the tensor
    digest, query = _duckdb_sha256(out, EMBED)
    print(f"duckdb puts the 128 chunks together: peak {query:.0f} MiB")
    assert digest == want[EMBED]
