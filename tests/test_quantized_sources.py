"""Quantized Hugging Face checkpoints (fp8, compressed-tensors, GPTQ, AWQ) as conversion
sources: the hf reader gives each quantized layer back as a lazy float32 ``X.weight``,
bit-exact against the layout's formula applied to the known codes the checkpoint was
written with (compressed-tensors: against the library's own decompression), streamed a
block of rows at a time; every output format takes it, and what it cannot read it
refuses in one line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import convcore
import convcore.rowblocks
from convcore.testing import quantized as Q

Built = tuple[Path, dict[str, np.ndarray]]

#: layout -> (builder, the reader's metadata["source_quantization"])
LAYOUTS: dict[str, tuple[Callable[[Path], Built], str]] = {
    "fp8-block": (lambda d: Q.fp8(d), "fp8 e4m3 block 128x128"),
    "fp8-block-ragged": (lambda d: Q.fp8(d, block=(96, 80)), "fp8 e4m3 block 96x80"),
    "fp8-tensor": (lambda d: Q.fp8(d, block=None), "fp8 e4m3 per-tensor"),
    "fbgemm-fp8-channel": (lambda d: Q.fp8(d, method="fbgemm_fp8", per_channel=True), "fbgemm_fp8 e4m3 per-channel"),
    "gptq-desc-act-asym": (lambda d: Q.gptq(d, desc_act=True, sym=False), "gptq 4-bit g64 desc_act asym"),
    "gptq-v2-sym": (lambda d: Q.gptq(d, checkpoint_format="gptq_v2", g_idx=False), "gptq 4-bit g64 sym v2"),
    "gptq-8bit-channel": (lambda d: Q.gptq(d, bits=8, group_size=-1), "gptq 8-bit per-channel sym"),
    "gptq-2bit-asym": (lambda d: Q.gptq(d, bits=2, group_size=32, sym=False), "gptq 2-bit g32 asym"),
    "awq-asym": (lambda d: Q.awq(d), "awq gemm 4-bit g64 asym"),
    "awq-sym": (lambda d: Q.awq(d, zero_point=False), "awq gemm 4-bit g64 sym"),
}
#: compressed-tensors layouts: the library's compressor's arguments
CT = {
    "pack-int4-group-asym": dict(fmt="pack-quantized", num_bits=4, group_size=64, symmetric=False),
    "pack-int4-group-sym": dict(fmt="pack-quantized", num_bits=4, group_size=128),
    "pack-int4-channel-asym": dict(fmt="pack-quantized", num_bits=4, strategy="channel", symmetric=False),
    "pack-int3-group-asym": dict(fmt="pack-quantized", num_bits=3, group_size=32, symmetric=False),
    "pack-int8-channel": dict(fmt="pack-quantized", num_bits=8, strategy="channel"),
    "pack-int4-tensor-asym": dict(fmt="pack-quantized", num_bits=4, strategy="tensor", symmetric=False),
    "int-int8-channel": dict(fmt="int-quantized", num_bits=8, strategy="channel"),
    "naive-int8-block-asym": dict(fmt="naive-quantized", num_bits=8, strategy="block", block=[64, 64],
                                  symmetric=False),
    "float-fp8-channel": dict(fmt="float-quantized", num_bits=8, type="float", strategy="channel"),
    "float-fp8-block": dict(fmt="float-quantized", num_bits=8, type="float", strategy="block", block=[128, 96]),
    # scales in bf16 / f16: the library computes in the scale's type; ours, rounded to it, agrees
    "pack-int4-group-asym-bf16": dict(fmt="pack-quantized", num_bits=4, group_size=64, symmetric=False,
                                      scale_dtype="bf16"),
    "float-fp8-block-bf16": dict(fmt="float-quantized", num_bits=8, type="float", strategy="block",
                                 block=[128, 128], scale_dtype="bf16"),
    "naive-int8-group-f16": dict(fmt="naive-quantized", num_bits=8, group_size=64, symmetric=False,
                                 scale_dtype="f16"),
}

@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Callable[[str], Built]:
    """Each layout's checkpoint, made once for the module."""
    made: dict[str, Built] = {}

    def get(layout: str) -> Built:
        if layout not in made:
            where = tmp_path_factory.mktemp(layout)
            if layout in CT:
                pytest.importorskip("compressed_tensors")
                made[layout] = Q.compressed(where / "model", **CT[layout])
            else:
                made[layout] = LAYOUTS[layout][0](where / "model")
        return made[layout]
    return get


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def check_model(model: convcore.Model, expected: dict[str, np.ndarray], rounded_to: str = "f32") -> None:
    """Every quantized layer bit-exact (in f32, or rounded to ``rounded_to`` as the
    reference was), every other tensor the source's own, no companion left."""
    _, _, source = Q.source()
    assert set(model.tensors) == set(source)   # HF names kept, companions gone
    assert "quantization_config" not in model.config
    for name, ref in model.tensors.items():
        got = ref.load()
        if name in expected:
            assert ref.dtype == "f32" and got.dtype == np.float32 and ref.shape == source[name].shape
            if rounded_to != "f32":
                got = convcore.cast(convcore.cast(got, rounded_to), "f32")
            assert same_bits(got, expected[name]), name
        else:
            assert same_bits(got, source[name]), name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reader_dequantizes_bit_exactly(layout: str, built) -> None:
    path, expected = built(layout)
    model = convcore.load(path)
    assert len(expected) == 14   # every linear layer of the two decoder layers
    assert model.metadata["source_quantization"] == LAYOUTS[layout][1]
    check_model(model, expected)


@pytest.mark.parametrize("layout", CT)
def test_compressed_tensors_equal_the_librarys_decompression(layout: str, built) -> None:
    path, expected = built(layout)
    model = convcore.load(path)
    args = CT[layout]
    assert model.metadata["source_quantization"].startswith(f"compressed-tensors {args['fmt']} ")
    check_model(model, expected, args.get("scale_dtype", "f32"))


def test_awq_equals_compressed_tensors_autoawq_converter(built) -> None:
    """A second, independent reading of AutoAWQ's packing: compressed-tensors' own AutoAWQ
    converter and decompressor (which compute in the scales' float16)."""
    pytest.importorskip("compressed_tensors")
    import torch
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    path, expected = built("awq-asym")
    refs, _ = convcore.open_tensors(path / "model.safetensors")
    model = convcore.load(path)
    scheme = QuantizationScheme(targets=["Linear"], format="pack-quantized", weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=False, strategy="group", group_size=64))
    converter = AutoAWQConverter(bits=4, group_size=64, zero_point=True)
    for name in expected:
        module = name.removesuffix(".weight")
        state = converter.process({f"{module}.{k}": torch.from_numpy(np.array(refs[f"{module}.{k}"].load()))
                                   for k in ("qweight", "qzeros", "scales")})
        local = {k.rsplit(".", 1)[-1]: v for k, v in state.items()}
        theirs = BaseCompressor.get_value_from_registry("pack-quantized").decompress(local, scheme)["weight"]
        assert same_bits(convcore.cast(model.tensors[name].load(), "f16"), theirs.numpy()), name


@pytest.mark.parametrize("layout", ["fp8-block-ragged", "gptq-desc-act-asym", "gptq-2bit-asym", "awq-asym",
                                    "pack-int3-group-asym", "float-fp8-block"])
def test_row_blocks_stream_what_load_gives(layout: str, built, monkeypatch) -> None:
    """Blocks of a few rows (unaligned to packed words, groups and fp8 blocks) give the
    same bits, whole and as the writers' chunks in f32 and f16."""
    path, expected = built(layout)
    monkeypatch.setattr(convcore.rowblocks, "BLOCK_ELEMENTS", 5000)   # 19 rows of 256, 9 of 512
    model = convcore.load(path)
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.gate_proj.weight",
                 "model.layers.1.mlp.down_proj.weight"):
        ref, want = model.tensors[name], expected[name]
        assert same_bits(ref.load(), want), name
        assert same_bits(np.concatenate(list(ref.load_chunks("f32"))), want.reshape(-1)), name
        assert same_bits(np.concatenate(list(ref.load_chunks("f16"))), convcore.cast(want, "f16").reshape(-1))


@pytest.mark.parametrize("layout", ["fp8-block", "gptq-desc-act-asym", "awq-asym"])
def test_loading_reads_no_tensor_data(layout: str, built, monkeypatch) -> None:
    path, expected = built(layout)
    maps = []
    real = np.memmap

    def counting(*args: Any, **kwargs: Any) -> np.memmap:
        maps.append(args)
        return real(*args, **kwargs)
    monkeypatch.setattr(np, "memmap", counting)
    model = convcore.load(path)
    assert maps == []
    model.tensors[next(iter(expected))].load()
    assert maps


@pytest.mark.parametrize("layout", ["fp8-block", "gptq-desc-act-asym", "awq-asym", "pack-int4-group-asym"])
def test_convert_to_hf_writes_the_dequantized_float32(layout: str, built, tmp_path: Path) -> None:
    path, expected = built(layout)
    out = convcore.convert(path, tmp_path / "hf", "hf")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    written, _ = convcore.open_tensors(out / "model.safetensors")
    _, _, source = Q.source()
    assert set(written) == set(source)
    for name, ref in written.items():
        assert same_bits(ref.load(), expected.get(name, source[name])), name


IDS = [1, 5, 9, 20, 33, 7]


def llamacpp_logits(path: Path) -> np.ndarray:
    with convcore.get_registry().open_session(path, "gguf", {"n_ctx": 64}) as session:
        return np.asarray(session.logits(IDS), np.float64)


@pytest.fixture(scope="module")
def source_logits(tmp_path_factory) -> np.ndarray:
    """llama.cpp's logits of the float32 model the checkpoints were quantized from."""
    pytest.importorskip("llama_cpp")
    return llamacpp_logits(convcore.convert(Q.source()[0], tmp_path_factory.mktemp("source") / "f32.gguf",
                                            "gguf", dtype="f32"))


@pytest.mark.llamacpp
@pytest.mark.parametrize("layout", ["fp8-block", "gptq-desc-act-asym", "awq-asym", "pack-int4-group-asym"])
def test_convert_to_gguf_q8_0_runs_in_llamacpp(layout: str, built, source_logits, tmp_path: Path) -> None:
    """q8_0 GGUF from the quantized checkpoint runs in llama.cpp, its logits near the
    float32 source model's (4-bit weights move them ~16% of their range, garbage ~100%)."""
    path, _ = built(layout)
    got = llamacpp_logits(convcore.convert(path, tmp_path / "q.gguf", "gguf", quant="q8_0"))
    want = source_logits
    assert got.shape == (len(IDS), 1024) and np.isfinite(got).all()
    assert np.abs(got - want).max() < 0.3 * np.abs(want).max()


# refusals -----------------------------------------------------------------------------------
def variant(built, layout: str, tmp_path: Path, config: dict[str, Any] | None = None,
            drop: str | None = None) -> Path:
    """A copy of ``layout``'s checkpoint with quantization_config entries changed (None
    removes one) and, with ``drop``, that tensor left out."""
    path, _ = built(layout)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    for key, value in (config or {}).items():
        if value is None:
            qc.pop(key, None)
        else:
            qc[key] = value
    refs, _ = convcore.open_tensors(path / "model.safetensors")
    return Q.write_checkpoint(tmp_path / "variant", qc,
                              {n: np.array(r.load()) for n, r in refs.items() if n != drop})


def one_line_error(path: Path) -> str:
    with pytest.raises(convcore.ConvcoreError) as info:
        convcore.load(path)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("method", ["bitsandbytes", "hqq", "exl2"])
def test_unknown_quant_method_is_one_line(method: str, built, tmp_path: Path) -> None:
    path = variant(built, "gptq-v2-sym", tmp_path, {"quant_method": method})
    message = one_line_error(path)
    assert message.startswith(f"{path / 'config.json'}: ") and repr(method) in message
    assert "not supported as a conversion source" in message
    with pytest.raises(convcore.ConvcoreError, match=method):
        convcore.convert(path, tmp_path / "out.gguf", "gguf", quant="q8_0")
    assert not (tmp_path / "out.gguf").exists()


def test_cli_names_the_method_and_inspect_shows_the_source_quantization(built, tmp_path: Path, capsys) -> None:
    from convcore.cli import main

    path, _ = built("gptq-desc-act-asym")
    main(["inspect", "--json", str(path)])
    info = json.loads(capsys.readouterr().out)
    assert info["metadata"]["source_quantization"] == "gptq 4-bit g64 desc_act asym"
    assert info["tensors_by_dtype"]["gptq-int4-g64"]["tensors"] == 14
    with pytest.raises(SystemExit):
        main(["inspect", str(variant(built, "gptq-v2-sym", tmp_path, {"quant_method": "hqq"}))])
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "config.json" in err and "'hqq'" in err


@pytest.mark.parametrize("layout, change, words", [
    ("gptq-v2-sym", {"bits": 3}, "gptq with 3-bit weights"),
    ("gptq-v2-sym", {"checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
    ("awq-asym", {"version": "gemv"}, "awq version 'gemv'"),
    ("fp8-block", {"weight_block_size": [128]}, "weight_block_size [128]"),
    ("pack-int4-group-asym", {"format": "nvfp4-pack-quantized"}, "format 'nvfp4-pack-quantized'"),
    ("pack-int4-group-asym", {"sparsity_config": {"format": "sparse-24-bitmask"}}, "sparsity format"),
    ("pack-int4-group-asym", {"quant_method": None, "bits": 4, "group_size": 64}, "format mlx"),
])
def test_unsupported_variants_are_one_line(layout: str, change: dict, words: str, built, tmp_path: Path) -> None:
    path = variant(built, layout, tmp_path, change)
    message = one_line_error(path)
    assert message.startswith(f"{path / 'config.json'}: ") and words in message


@pytest.mark.parametrize("layout, missing", [
    ("gptq-desc-act-asym", "model.layers.0.self_attn.q_proj.scales"),
    ("gptq-desc-act-asym", "model.layers.1.mlp.up_proj.g_idx"),
    ("awq-asym", "model.layers.0.mlp.down_proj.qzeros"),
    ("fp8-block", "model.layers.1.self_attn.o_proj.weight_scale_inv"),
    ("pack-int4-group-asym", "model.layers.0.self_attn.k_proj.weight_scale"),
    ("pack-int4-group-asym", "model.layers.0.self_attn.k_proj.weight_shape"),
    ("pack-int4-group-asym", "model.layers.0.self_attn.v_proj.weight_zero_point"),
])
def test_a_missing_companion_is_one_line_naming_file_and_tensor(layout: str, missing: str, built,
                                                                 tmp_path: Path) -> None:
    path = variant(built, layout, tmp_path, drop=missing)
    message = one_line_error(path)
    assert message.startswith(f"{path / 'model.safetensors'}: tensor ") and repr(missing) in message
