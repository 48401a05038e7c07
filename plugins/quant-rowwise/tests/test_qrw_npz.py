"""Format npz (APL): every tensor written, plain member names, validation, read back."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

import convcore
from convcore.testing.conformance import check_format


@pytest.mark.parametrize("scheme,bits", [("int8-row", 8), ("int4-row", 4), ("int2-row", 2), ("int1-row", 1)])
def test_npz_holds_every_tensor_and_validates(tiny_llama, tmp_path, scheme, bits):
    out = convcore.convert(tiny_llama, tmp_path / "npz", to="npz", quant=scheme)
    src = convcore.load(tiny_llama)
    manifest_file, = out.glob("*_manifest_q*.json")
    assert manifest_file.name.endswith(f"_manifest_q{bits}.json")
    manifest = json.loads(manifest_file.read_text())
    assert manifest["format_version"] == 1
    assert manifest["model"]["hidden_size"] == 256 and manifest["model"]["num_layers"] == 2
    assert manifest["model"]["num_kv_heads"] == 2 and manifest["model"]["vocab_size"] == 1024
    assert manifest["quantization"]["type"] == "perrow_int" and manifest["quantization"]["bits"] == bits
    assert [w["name"] for w in manifest["weights"]] == list(src.tensors)
    with zipfile.ZipFile(out / manifest["file"]) as zf:
        members = {n.removesuffix(".npy") for n in zf.namelist()}
    for w in manifest["weights"]:
        for key in ("q", "q_scales", "q_zero_point"):
            if w.get(key):
                assert "/" not in w[key] and w[key] in members
        assert w["bit_width"] == (bits if len(w["shape"]) == 2 else 32)
    assert convcore.get_registry().validate(out) == []
    back = convcore.load(out)
    assert back.format == "npz" and list(back.tensors) == list(src.tensors)
    for name, ref in src.tensors.items():
        got = back.tensors[name].load()
        assert got.shape == ref.shape
        if len(ref.shape) == 1:
            np.testing.assert_array_equal(got, ref.load())  # norms kept exactly
    # quantized weights also stream (the hf writer's chunks) a block of rows at a time
    from convcore import rowblocks
    for block in (rowblocks.BLOCK_ELEMENTS, 300):  # 300: a row or two per block
        rowblocks.BLOCK_ELEMENTS = block
        try:
            for name, ref in convcore.load(out).tensors.items():
                if ref.stored:
                    pieces = list(ref.load_chunks("f16"))
                    assert len(pieces) == (1 if block > 1 << 20 else -(-ref.shape[0] // (300 // ref.shape[1] or 1)))
                    assert np.concatenate(pieces).tobytes() == convcore.cast(ref.load(), "f16").reshape(-1).tobytes()
        finally:
            rowblocks.BLOCK_ELEMENTS = 1 << 21
    norm = np.linalg.norm
    w = src.tensors["model.layers.0.mlp.down_proj.weight"].load()
    err = norm(back.tensors["model.layers.0.mlp.down_proj.weight"].load() - w) / norm(w)
    assert err < {8: 0.01, 4: 0.15, 2: 0.6, 1: 1.0}[bits]


def test_npz_to_hf_keeps_config_and_tokenizer(tiny_llama, tmp_path):
    out = convcore.convert(tiny_llama, tmp_path / "npz", to="npz", quant="int8-row")
    hf = convcore.convert(out, tmp_path / "hf", to="hf")
    assert json.loads((hf / "config.json").read_text()) == json.loads((tiny_llama / "config.json").read_text()) | {}
    assert (hf / "tokenizer.model").read_bytes() == (tiny_llama / "tokenizer.model").read_bytes()


def test_npz_conformance(tiny_llama, tmp_path):
    check_format("npz", tiny_llama, tmp_path, lossless=False, quant="int8-row")


@pytest.fixture
def npz_dir(tiny_llama, tmp_path):
    return convcore.convert(tiny_llama, tmp_path / "npz", to="npz", quant="int4-row")


def test_missing_member_is_an_error(npz_dir, tmp_path):
    manifest_file, = npz_dir.glob("*_manifest_*.json")
    manifest = json.loads(manifest_file.read_text())
    manifest["weights"][3]["q_scales"] = "no_such_member"
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(convcore.ConvcoreError, match="member 'no_such_member'.* is missing"):
        convcore.load(npz_dir)
    problems = convcore.get_registry().validate(npz_dir)
    assert len(problems) == 1 and "no_such_member" in problems[0]


def test_path_as_member_name_is_refused(npz_dir, run_cli):
    manifest_file, = npz_dir.glob("*_manifest_*.json")
    manifest = json.loads(manifest_file.read_text())
    manifest["weights"][0]["q"] = "../../etc/passwd"
    manifest_file.write_text(json.dumps(manifest))
    r = run_cli("run", npz_dir, "-o", npz_dir.parent / "hf", "--to", "hf")
    assert r.returncode != 0 and r.stderr.count("\n") == 1
    assert "is not a plain member name" in r.stderr
    assert not (npz_dir.parent / "hf").exists()


def test_recorded_error_over_tolerance_fails_validation(npz_dir):
    manifest_file, = npz_dir.glob("*_manifest_*.json")
    manifest = json.loads(manifest_file.read_text())
    manifest["weights"][1]["rel_error"] = 0.2
    manifest_file.write_text(json.dumps(manifest))
    problems = convcore.get_registry().validate(npz_dir)
    assert len(problems) == 1 and "over the 0.15 tolerance for 4 bits" in problems[0]


def test_apl_manifest_goes_both_ways(tiny_llama, tmp_path, run_cli):
    """-O manifest=apl writes APL's own manifest (format_version "2", family/hidden_dim/
    context_length, per-weight quantization, .npy member names, top-level metadata, no
    rel_error); both manifests read back to the same tensors."""
    ours, apl = tmp_path / "ours", tmp_path / "apl"
    convcore.convert(tiny_llama, ours, "npz", quant="int4-row")
    r = run_cli("run", tiny_llama, "--to", "npz", "--quant", "int4-row", "-O", "manifest=apl",
                "--metadata", "author=apl-test", "-o", apl)
    assert r.returncode == 0, r.stderr
    manifest = json.loads(next(apl.glob("*_manifest_q4.json")).read_text())
    assert manifest["format_version"] == "2" and manifest["metadata"] == {"author": "apl-test"}
    assert manifest["model"]["family"] == "llama" and manifest["model"]["hidden_dim"] == 256
    assert manifest["model"]["context_length"] == 512
    first = next(w for w in manifest["weights"] if w["quantization"]["type"] == "perrow_int")
    assert first["quantization"]["bits"] == 4 and first["q"].endswith(".npy")
    assert not any("rel_error" in w or "bit_width" in w for w in manifest["weights"])
    assert convcore.get_registry().validate(apl, "npz") == []
    a, b = convcore.load(ours), convcore.load(apl)
    assert b.metadata["author"] == "apl-test" and b.arch == "llama"
    assert list(a.tensors) == list(b.tensors)
    for name in a.tensors:
        assert np.array_equal(a.tensors[name].load(), b.tensors[name].load()), name


def test_an_apl_manifest_without_config_reads_its_family(tiny_llama, tmp_path):
    out = tmp_path / "apl"
    convcore.convert(tiny_llama, out, "npz", quant="int8-row", options={"manifest": "apl"})
    (out / "config.json").unlink()
    model = convcore.load(out)
    assert model.arch == "llama" and model.tensors["model.norm.weight"].dtype == "f32"
