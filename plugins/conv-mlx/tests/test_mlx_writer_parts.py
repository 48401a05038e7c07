"""Pieces of the writer that the tiny models do not reach: row-block quantization and
casting of tensors larger than one block."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import convcore
from conv_mlx.layout import SCHEMES, packed_shapes, parse_scheme, recipe_bits
from conv_mlx.writer import cast_rows, quantize_rows


@pytest.mark.parametrize("scheme,dtype", [("int4-g64", "f16"), ("int3-g32", "bf16"), ("int6-g128", "f32")])
def test_mlx_quantize_rows_in_blocks_equals_one_call(affine_registry, scheme, dtype):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((300, 512)) * 0.05).astype(np.float32)
    whole = convcore.quantize(convcore.cast(w, dtype), scheme, registry=affine_registry).data
    blocks = quantize_rows(w, dtype, scheme, "t", affine_registry, chunk_bytes=512 * 4 * 7)
    bits, group = parse_scheme(scheme)
    wshape, sshape = packed_shapes(w.shape, bits, group)
    assert blocks["weight"].shape == wshape and blocks["scales"].shape == sshape
    for key in ("weight", "scales", "biases"):
        assert blocks[key].dtype == whole[key].dtype
        assert blocks[key].tobytes() == whole[key].tobytes(), key


def test_mlx_cast_rows_in_blocks_equals_cast():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((257, 64)).astype(ml_dtypes.bfloat16)
    got = cast_rows(w, "f16", chunk_bytes=64 * 4 * 10)
    assert got.tobytes() == convcore.cast(w, "f16").tobytes()


def test_mlx_scheme_table_and_recipe():
    assert len(SCHEMES) == 18 and "int3-g64" in SCHEMES
    with pytest.raises(convcore.ConvcoreError):
        parse_scheme("int7-g64")
    # mlx-lm's mixed recipe on 16 layers: first/last eighth and every third layer between
    high = [i for i in range(16) if recipe_bits("mixed_3_6", f"model.layers.{i}.mlp.down_proj", 16) == 6]
    assert high == [0, 1, 4, 7, 10, 13, 14, 15]
    assert recipe_bits("mixed_3_6", "model.layers.4.mlp.up_proj", 16) == 3
    assert recipe_bits("mixed_2_6", "lm_head", 16) == 6


@pytest.mark.parametrize("quant", ["f16", "int4-g64"])
def test_mlx_streamed_float_tensors_write_the_same_files(tiny_model_factory, tmp_path, monkeypatch,
                                                         affine_registry, quant):
    """Float tensors of STREAM_BYTES or more are cast a chunk at a time as the writer
    takes them (the 1.1B model's embedding and lm_head), and quantized ones whose packed
    weight is that large are quantized a block of rows at a time as it is written
    (QuantizedStream); every tensor streamed, in chunks smaller than a row and blocks of
    a few rows, gives the same files as none streamed."""
    from conv_mlx import writer

    src = tiny_model_factory("llama")
    outs = {}
    for label, stream_bytes, chunk in (("made", 1 << 62, writer.CHUNK_ELEMENTS), ("streamed", 0, 1000)):
        monkeypatch.setattr(writer, "STREAM_BYTES", stream_bytes)
        monkeypatch.setattr(writer, "CHUNK_ELEMENTS", chunk)
        monkeypatch.setattr(writer.cast_stream, "__defaults__", (chunk,))
        monkeypatch.setattr(writer.QuantizedStream.__init__, "__defaults__", (chunk * 4,))
        outs[label] = convcore.convert(src, tmp_path / label, to="mlx", quant=quant)
    files = sorted(p.name for p in outs["made"].iterdir())
    assert files == sorted(p.name for p in outs["streamed"].iterdir())
    for name in files:
        assert (outs["made"] / name).read_bytes() == (outs["streamed"] / name).read_bytes(), name


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_mlx_reader_dequantizes_a_block_of_rows_at_a_time(tiny_model_factory, tmp_path, monkeypatch,
                                                          affine_registry, dtype):
    """Quantized modules are read back a block of rows at a time (load and the hf
    writer's chunks): one row per block gives the same values as whole tensors, in the
    scales' own dtype (bf16: mx.dequantize's two roundings) and in f32."""

    out = convcore.convert(tiny_model_factory("llama"), tmp_path / "m", to="mlx", quant="int4-g64",
                           dtype=dtype)
    whole = {n: r.load() for n, r in convcore.load(out).tensors.items() if r.stored}
    assert whole and all(convcore.dtype_name(a.dtype) == dtype for a in whole.values())
    monkeypatch.setattr(convcore.rowblocks, "BLOCK_ELEMENTS", 1)
    model = convcore.load(out)
    for name, want in whole.items():
        ref = model.tensors[name]
        assert ref.load().tobytes() == want.tobytes(), name
        pieces = list(ref.load_chunks("f16"))
        assert len(pieces) == int(np.prod(ref.shape[:-1])), name
        assert np.concatenate(pieces).tobytes() == convcore.cast(want, "f16").reshape(-1).tobytes(), name
