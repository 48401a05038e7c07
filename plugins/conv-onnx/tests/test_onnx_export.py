"""The export path (``conv_onnx.export``): torch.onnx.export(dynamo=True) of the
transformers model, checked in its real consumers: onnxruntime's logits against
transformers', onnxruntime-genai's greedy generation against ``generate``, and the
``convcore.tensors`` metadata against the source safetensors, byte for byte."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

import convcore
from convcore import ConvcoreError
from convcore.testing.models import tiny_model

PROMPT = [1, 5, 9, 100, 200, 33, 44]  # 7 tokens, bos first


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


# fixtures: each export once per session -------------------------------------------------
@pytest.fixture(scope="session")
def bert_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny BERT encoders with random weights: ``bert`` (BertModel, norms and biases
    randomised) and ``bert-mlm`` (a BertForMaskedLM checkpoint as trained heads ship:
    ``bert.`` prefix, ``cls.*`` head tensors AutoModel does not use, zero biases that the
    optimizer merges)."""
    import torch
    import transformers

    root = tmp_path_factory.mktemp("bert-src")
    config = transformers.BertConfig(vocab_size=512, hidden_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=256,
                                     max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(root / "bert")
    torch.manual_seed(1)
    transformers.BertForMaskedLM(config).eval().save_pretrained(root / "bert-mlm")
    return {"bert": root / "bert", "bert-mlm": root / "bert-mlm"}


@pytest.fixture(scope="session")
def exported(tmp_path_factory, bert_dirs):
    """``exported(name, dtype="f32") -> (source dir, output dir, progress names, seconds)``."""
    from conv_onnx.export import export_onnx

    root = tmp_path_factory.mktemp("onnx-export")
    cache: dict = {}

    def get(name: str, dtype: str = "f32"):
        if (name, dtype) not in cache:
            src = bert_dirs[name] if name in bert_dirs else tiny_model(name)
            model = convcore.load(src)
            out = root / f"{name}-{dtype}"
            names: list[str] = []
            start = time.perf_counter()
            export_onnx(model, out, {"dtype": dtype}, names.append)
            cache[name, dtype] = (src, out, names, time.perf_counter() - start)
        return cache[name, dtype]

    return get


def _hf_model(src: Path, causal: bool = True):
    import torch
    import transformers

    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    return cls.from_pretrained(str(src), dtype=torch.float32).eval()


class _Decoder:
    """An onnxruntime session of an exported decoder, fed and read by name."""

    def __init__(self, out: Path) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        keys = [i for i in self.session.get_inputs() if i.name.endswith(".key")]
        self.layers = len(keys)
        self.kv_heads, self.head_dim = keys[0].shape[1], keys[0].shape[3]
        self.float = np.float16 if "float16" in keys[0].type else np.float32
        self.outputs = [o.name for o in self.session.get_outputs()]

    def empty_past(self, batch: int = 1) -> list:
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), self.float)
        return [(empty, empty) for _ in range(self.layers)]

    def __call__(self, ids, mask, positions, past):
        feed = {"input_ids": np.asarray(ids, np.int64), "attention_mask": np.asarray(mask, np.int64),
                "position_ids": np.asarray(positions, np.int64)}
        for i, (k, v) in enumerate(past):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = k, v
        out = dict(zip(self.outputs, self.session.run(None, feed)))
        present = [(out[f"present.{i}.key"], out[f"present.{i}.value"]) for i in range(self.layers)]
        return out["logits"].astype(np.float32), present


# 1. logits: prefill with empty past, then one decode step with the presents fed back -----
@pytest.mark.slow
@pytest.mark.onnx
def test_llama_logits_match_transformers_prefill_and_decode(exported):
    import torch

    src, out, _, _ = exported("llama")
    decoder = _Decoder(out)
    hf = _hf_model(src)
    n = len(PROMPT)
    logits, present = decoder([PROMPT], np.ones((1, n)), [list(range(n))], decoder.empty_past())
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT]), use_cache=True)
    assert logits.shape == (1, n, hf.config.vocab_size)
    assert np.abs(logits - ref.logits.numpy()).max() <= 1e-4
    assert present[0][0].shape == (1, decoder.kv_heads, n, decoder.head_dim)

    step, _ = decoder([[7]], np.ones((1, n + 1)), [[n]], present)
    with torch.no_grad():
        ref_step = hf(torch.tensor([[7]]), cache=ref.cache, use_cache=True)
    assert np.abs(step - ref_step.logits.numpy()).max() <= 1e-4


@pytest.mark.slow
@pytest.mark.onnx
def test_llama_left_padded_batch_matches_transformers(exported):
    import torch

    src, out, _, _ = exported("llama")
    decoder = _Decoder(out)
    ids = np.array([[0, 0, 5, 9, 100], [1, 5, 9, 100, 200]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    logits, _ = decoder(ids, mask, positions, decoder.empty_past(2))
    with torch.no_grad():
        ref = _hf_model(src)(torch.tensor(ids), attention_mask=torch.tensor(mask),
                             position_ids=torch.tensor(positions)).logits.numpy()
    assert not np.isnan(logits).any()
    assert np.abs(logits - ref)[mask.astype(bool)].max() <= 1e-4


# 2. onnxruntime-genai greedy generation == transformers generate --------------------------
@pytest.mark.slow
@pytest.mark.onnx
def test_llama_genai_greedy_generation_matches_transformers(exported):
    pytest.importorskip("onnxruntime_genai")
    from onnx_helpers import genai_greedy, hf_greedy

    src, out, _, _ = exported("llama")
    want = hf_greedy(_hf_model(src), PROMPT, 20)  # min_new_tokens: eos can't end either early
    assert genai_greedy(out, PROMPT, 20) == want


# 3. encoder: last_hidden_state --------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.onnx
def test_bert_last_hidden_state_matches_transformers(exported):
    import onnxruntime as ort
    import torch

    src, out, _, _ = exported("bert")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    outputs = [o.name for o in session.get_outputs()]
    assert outputs[0] == "last_hidden_state"
    rng = np.random.RandomState(0)
    ids = rng.randint(0, 512, (3, 11))
    mask = np.ones((3, 11), np.int64)
    mask[2, 7:] = 0
    types = np.zeros((3, 11), np.int64)
    types[:, 5:] = 1
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    got = dict(zip(outputs, session.run(None, feed)))
    with torch.no_grad():
        ref = _hf_model(src, causal=False)(torch.tensor(ids), attention_mask=torch.tensor(mask),
                                            token_type_ids=torch.tensor(types))
    assert np.abs(got["last_hidden_state"] - ref.last_hidden_state.numpy()).max() <= 1e-4
    assert np.abs(got["pooler_output"] - ref.pooler_output.numpy()).max() <= 1e-4
    assert not (out / "genai_config.json").exists()


@pytest.mark.slow
@pytest.mark.onnx
def test_encoder_from_task_checkpoint_leaves_out_a_missing_pooler(exported):
    import onnxruntime as ort

    _, out, _, _ = exported("bert-mlm")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    # BertForMaskedLM has no pooler: AutoModel would initialise one at random
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state"]


# 4. convcore.tensors metadata: complete, and bit-identical to the source --------------------
def _metadata_and_initializers(out: Path) -> tuple[dict, dict]:
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(out / "model.onnx"), load_external_data=True)
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["convcore.tensors"])
    return meta, {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


@pytest.mark.slow
@pytest.mark.onnx
@pytest.mark.parametrize("name", ["llama", pytest.param("gemma", marks=pytest.mark.full), "bert",
                                  pytest.param("bert-mlm", marks=pytest.mark.full)])
def test_tensor_metadata_is_complete_and_bit_identical(exported, name):
    from safetensors.numpy import load_file

    src, out, progress, _ = exported(name)
    source = load_file(str(src / "model.safetensors"))
    meta, inits = _metadata_and_initializers(out)
    assert set(meta) == set(source)
    assert sorted(progress) == sorted(source)  # progress once per HF tensor
    for hf_name, ref in source.items():
        entry = meta[hf_name]
        assert set(entry) == {"init", "transpose"}
        data = inits[entry["init"]]
        if entry["transpose"]:
            data = data.T
        assert data.dtype == ref.dtype and data.shape == ref.shape, hf_name
        assert np.array_equal(data, ref), hf_name


@pytest.mark.slow
@pytest.mark.onnx
def test_tensor_metadata_naming_facts(exported):
    """Linear weights are stored transposed as ``<name>.T``; norms and embeddings as
    they are, under their HF names; buffers (rotary inv_freq) are not listed."""
    _, out, _, _ = exported("llama")
    meta, inits = _metadata_and_initializers(out)
    q = meta["model.layers.0.self_attn.q_proj.weight"]
    assert q == {"init": "model.layers.0.self_attn.q_proj.weight.T", "transpose": True}
    assert meta["lm_head.weight"] == {"init": "lm_head.weight.T", "transpose": True}
    assert meta["model.embed_tokens.weight"] == {"init": "model.embed_tokens.weight", "transpose": False}
    assert meta["model.norm.weight"] == {"init": "model.norm.weight", "transpose": False}
    assert not any("inv_freq" in k for k in meta)


@pytest.mark.slow
@pytest.mark.onnx
def test_tied_embedding_is_stored_once(exported):
    from safetensors.numpy import load_file

    src, out, _, _ = exported("gemma")
    assert json.loads((src / "config.json").read_text()).get("tie_word_embeddings", True)
    meta, inits = _metadata_and_initializers(out)
    embed = load_file(str(src / "model.safetensors"))["model.embed_tokens.weight"]
    assert meta["model.embed_tokens.weight"] == {"init": "model.embed_tokens.weight", "transpose": False}
    # one copy of the (vocab x hidden) matrix in the file, in either orientation
    copies = [n for n, a in inits.items() if a.shape in (embed.shape, embed.shape[::-1])]
    assert copies == ["model.embed_tokens.weight"]


# 5. f16 ------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.onnx
def test_llama_f16_logits_close_to_transformers_f32(exported):
    import torch

    src, out, _, _ = exported("llama", "f16")
    decoder = _Decoder(out)
    assert decoder.float == np.float16
    n = len(PROMPT)
    logits, present = decoder([PROMPT], np.ones((1, n)), [list(range(n))], decoder.empty_past())
    with torch.no_grad():
        ref = _hf_model(src)(torch.tensor([PROMPT])).logits.numpy()
    assert rel_err(logits, ref) <= 1e-2
    assert present[0][0].dtype == np.float16


# 6. layout ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.onnx
def test_layout_external_data_and_io(exported):
    import onnx

    src, out, _, seconds = exported("llama")
    print(f"tiny llama export: {seconds:.1f} s")
    files = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model.onnx.data", "config.json", "genai_config.json", "tokenizer.json",
            "tokenizer_config.json", "tokenizer.model"} <= files
    assert not any(name.endswith(".data") and name != "model.onnx.data" for name in files)
    assert (out / "model.onnx").stat().st_size < 1_000_000
    assert (out / "model.onnx.data").stat().st_size > 6_000_000  # the weights (6.8 MB of f32)
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())

    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert proto.opset_import[0].version >= 18
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["convcore.tensors"])
    locations = set()
    external = set()
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            external.add(tensor.name)
            locations.update(e.value for e in tensor.external_data if e.key == "location")
    assert locations == {"model.onnx.data"}  # one file, relative
    assert {e["init"] for e in meta.values()} <= external  # every weight, whatever its size

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    inputs = {i.name: dims(i) for i in proto.graph.input}
    outputs = {o.name: dims(o) for o in proto.graph.output}
    layers = 2
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert set(inputs) == {"input_ids", "attention_mask", "position_ids"} | {
        f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")}
    assert set(outputs) == {"logits"} | {f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")}
    batch, seq = inputs["input_ids"]
    assert isinstance(batch, str) and isinstance(seq, str)
    key = inputs["past_key_values.0.key"]
    assert key[0] == batch and isinstance(key[2], str) and key[1:4:2] == [2, 64]

    genai = json.loads((out / "genai_config.json").read_text())
    decoder = genai["model"]["decoder"]
    assert decoder["inputs"] == {"input_ids": "input_ids", "attention_mask": "attention_mask",
                                 "position_ids": "position_ids",
                                 "past_key_names": "past_key_values.%d.key",
                                 "past_value_names": "past_key_values.%d.value"}
    assert decoder["outputs"] == {"logits": "logits", "present_key_names": "present.%d.key",
                                  "present_value_names": "present.%d.value"}
    assert (decoder["head_size"], decoder["hidden_size"], decoder["num_attention_heads"],
            decoder["num_key_value_heads"], decoder["num_hidden_layers"]) == (64, 256, 4, 2, 2)
    assert genai["search"]["past_present_share_buffer"] is False
    assert genai["model"]["context_length"] == 512 and genai["model"]["vocab_size"] == 1024
    assert (genai["model"]["bos_token_id"], genai["model"]["eos_token_id"]) == (1, 2)
    assert genai["model"]["type"] == "llama"


# fast checks ---------------------------------------------------------------------------------
def test_genai_config_for_reads_config_and_generation_config():
    from conv_onnx.export_genai import genai_config_for

    config = {"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
              "num_hidden_layers": 3, "vocab_size": 100, "max_position_embeddings": 128,
              "bos_token_id": 5, "eos_token_id": 6}
    gen = {"eos_token_id": [6, 7], "do_sample": True, "temperature": 0.7, "top_k": 20}
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    outputs = {"logits": "logits"}
    cfg = genai_config_for(config, gen, inputs=inputs, outputs=outputs, share_buffer=False)
    model = cfg["model"]
    assert (model["bos_token_id"], model["eos_token_id"], model["pad_token_id"]) == (5, [6, 7], 6)
    assert model["decoder"]["head_size"] == 16 and model["decoder"]["filename"] == "model.onnx"
    assert model["type"] == "qwen2" and model["context_length"] == 128
    assert cfg["search"]["do_sample"] is True and cfg["search"]["temperature"] == 0.7
    assert cfg["search"]["top_k"] == 20 and cfg["search"]["max_length"] == 128
    other = genai_config_for({**config, "model_type": "somethingnew"}, None, inputs=inputs,
                             outputs=outputs, share_buffer=True, filename="m.onnx", turn_end_id=9)
    assert other["model"]["type"] == "decoder" and other["model"]["eos_token_id"] == [9, 6]
    assert other["search"]["past_present_share_buffer"] is True
    assert other["model"]["decoder"]["filename"] == "m.onnx"


def test_is_causal_lm():
    from conv_onnx.export import is_causal_lm

    assert is_causal_lm({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    assert is_causal_lm({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    assert not is_causal_lm({"architectures": ["BertForMaskedLM"], "model_type": "bert"})
    assert is_causal_lm({"model_type": "llama"})
    assert not is_causal_lm({"model_type": "bert"})


def test_unsupported_dtype_and_encoder_decoder_are_clear_errors(tmp_path):
    from conv_onnx.export import export_onnx

    model = convcore.load(tiny_model("llama"))
    with pytest.raises(ConvcoreError, match="f32 or f16, not 'bf16'"):
        export_onnx(model, tmp_path / "a", {"dtype": "bf16"}, lambda n: None)
    model.config = {**model.config, "is_encoder_decoder": True}
    with pytest.raises(ConvcoreError, match="encoder-decoder"):
        export_onnx(model, tmp_path / "b", {}, lambda n: None)
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_exporter_failure_is_one_line_naming_the_arch(tmp_path, monkeypatch):
    import torch

    from conv_onnx.export import export_onnx

    def broken(*args, **kwargs):
        raise RuntimeError("Failed to export\nlong traceback text")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(ConvcoreError) as info:
        export_onnx(convcore.load(tiny_model("llama")), tmp_path / "out", {}, lambda n: None)
    assert str(info.value) == "llama: torch.onnx.export failed: RuntimeError: Failed to export"
    assert not (tmp_path / "out").exists()  # nothing half-written left behind


# through the CLI: an arch the builder does not know goes to the export path with a note --
@pytest.mark.slow
@pytest.mark.onnx
def test_cli_encoder_goes_to_export_with_a_note_and_reads_back(bert_dirs, tmp_path, run_cli):
    src = bert_dirs["bert"]
    out = tmp_path / "bert-onnx"
    res = run_cli("run", src, "--to", "onnx", "-o", out, "-q")
    assert res.returncode == 0, res.stderr
    assert "note: the onnx builder does not know 'bert'" in res.stderr
    assert run_cli("validate", out).returncode == 0
    back = tmp_path / "bert-hf"
    assert run_cli("run", out, "--to", "hf", "-o", back, "-q").returncode == 0
    a, b = convcore.load(src), convcore.load(back)
    assert set(a.tensors) == set(b.tensors)
    assert all(np.array_equal(a.tensors[n].load(), b.tensors[n].load()) for n in a.tensors)


@pytest.mark.full
@pytest.mark.onnx
def test_cli_encoder_export_path_quantized(bert_dirs, tmp_path, run_cli):
    """--quant on the export path: the encoder's Linear weights in MatMulNBits (the
    embeddings stay float); onnxruntime's hidden states equal transformers' on the
    dequantized weights the reader gives back."""
    src = bert_dirs["bert"]
    import onnxruntime as ort
    import torch
    q = tmp_path / "q"
    res = run_cli("run", src, "--to", "onnx", "-o", q, "--quant", "int8-b32", "-O", "accuracy_level=1", "-q")
    assert res.returncode == 0, res.stderr
    assert run_cli("validate", q).returncode == 0
    back_q = convcore.load(q)
    stored = {n: t.stored for n, t in back_q.tensors.items()}
    assert stored["encoder.layer.0.attention.self.query.weight"] == "int8-b32"
    assert stored["embeddings.word_embeddings.weight"] == ""
    hf = convcore.convert(q, tmp_path / "q-hf", to="hf")
    ids = np.random.RandomState(1).randint(0, 512, (2, 9))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    session = ort.InferenceSession(str(q / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["last_hidden_state"], feed)[0]
    with torch.no_grad():
        ref = _hf_model(hf, causal=False)(**{k: torch.tensor(v) for k, v in feed.items()}).last_hidden_state.numpy()
    assert np.abs(got - ref).max() <= 1e-4


@pytest.mark.slow
@pytest.mark.onnx
def test_export_path_runs_in_the_session_with_position_ids(tmp_path):
    src = tiny_model("qwen2")
    out = tmp_path / "q"
    convcore.convert(src, out, to="onnx", options={"path": "export"})
    ids = [5, 9, 200, 31, 7, 64, 11]
    ref = _hf_model(src)
    import torch
    with torch.no_grad():
        want = ref(torch.tensor([ids + [42]])).logits[0].numpy()
    with convcore.get_registry().open_session(out) as s:
        first, step = s.logits(ids), s.decode([42])
    assert np.abs(first - want[:-1]).max() <= 1e-4 and np.abs(step[0] - want[-1]).max() <= 1e-4
