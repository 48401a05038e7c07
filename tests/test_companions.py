"""Companion files (model card, licence, sentence-transformers modules and pooling folders,
tokenizer extras) travel unchanged through every HF-style directory writer."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import convcore
from convcore.builtins.hf import COMPANION_MAX_BYTES
from convcore.testing import tiny_encoder, tiny_model

SENTENCES = [
    "The deque is a list-like container with fast appends and pops on either end.",
    "hello world",
    "An OrderedDict remembers the order entries were added.",
    "Counter is a dict subclass for counting hashable objects.",
]
ENCODER_COMPANIONS = ("vocab.txt", "modules.json", "sentence_bert_config.json",
                      "config_sentence_transformers.json", "1_Pooling/config.json", "README.md")
WEIGHTS = ("config.json", "model.safetensors", "model.safetensors.index.json")


def files(path):
    """Relative POSIX path -> bytes of every file under ``path``."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def carried(path):
    """The files under ``path`` besides weights and config.json."""
    return {k: v for k, v in files(path).items() if k not in WEIGHTS}


def formats():
    return convcore.get_registry().formats


@pytest.fixture(scope="module")
def encoder():
    return tiny_encoder()


@pytest.fixture
def decoder(tmp_path):
    """tiny llama plus a model card, a licence and a pooling folder."""
    src = tmp_path / "src"
    shutil.copytree(tiny_model("llama"), src)
    (src / "README.md").write_text("---\nlicense: mit\n---\n# tiny llama\n")
    (src / "LICENSE").write_text("MIT License\n\nCopyright (c) convcore tests\n")
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text('{"word_embedding_dimension": 256}\n')
    return src


DECODER_COMPANIONS = ("README.md", "LICENSE", "1_Pooling/config.json")


# sentence embeddings ---------------------------------------------------------------------
def test_tiny_encoder_is_a_sentence_transformers_checkpoint(encoder):
    names = set(files(encoder))
    for name in (*ENCODER_COMPANIONS, "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "config.json", "model.safetensors"):
        assert name in names, name
    model = convcore.load(encoder)
    assert model.tokenizer["vocab.txt"] == (encoder / "vocab.txt").read_bytes()
    assert "vocab.txt" not in model.companions
    assert set(model.companions) == set(ENCODER_COMPANIONS) - {"vocab.txt"}


def test_hf_to_hf_f16_keeps_every_companion_byte_identical(encoder, tmp_path):
    out = convcore.convert(encoder, tmp_path / "out", to="hf", dtype="f16")
    src, dst = carried(encoder), carried(out)
    assert sorted(dst) == sorted(src)
    for name in src:
        assert dst[name] == src[name], name
    for name in ENCODER_COMPANIONS:
        assert name in dst, name
    if (encoder / "2_Normalize").is_dir():
        assert (out / "2_Normalize").is_dir()
    assert convcore.load(out).tensors["embeddings.word_embeddings.weight"].dtype == "f16"


def test_hf_f16_output_loads_in_sentence_transformers(encoder, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    torch = pytest.importorskip("torch")
    out = convcore.convert(encoder, tmp_path / "out", to="hf", dtype="f16")
    ref = st.SentenceTransformer(str(encoder), device="cpu").encode(SENTENCES)
    # computed in f32, so what is measured is the f16 weights, not f16 arithmetic
    got = st.SentenceTransformer(str(out), device="cpu",
                                 model_kwargs={"dtype": torch.float32}).encode(SENTENCES)
    assert got.shape == ref.shape == (4, 256)
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)  # Normalize kept
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() >= 0.9999, cos


# other HF-style directories ----------------------------------------------------------------
def round_trip(decoder, tmp_path, fmt, **kwargs):
    if fmt not in formats():
        pytest.skip(f"format {fmt} is not installed")
    mid = convcore.convert(decoder, tmp_path / fmt, to=fmt, **kwargs)
    back = convcore.convert(mid, tmp_path / f"{fmt}-hf", to="hf")
    src = files(decoder)
    for path in (mid, back):
        got = files(path)
        for name in DECODER_COMPANIONS:
            assert got.get(name) == src[name], (path, name)
    assert set(convcore.load(back).companions) == set(DECODER_COMPANIONS)
    return mid, back


def test_hf_mlx_hf_keeps_companions(decoder, tmp_path):
    round_trip(decoder, tmp_path, "mlx", quant="f32")


def test_hf_onnx_hf_keeps_companions(decoder, tmp_path):
    mid, _ = round_trip(decoder, tmp_path, "onnx")
    # the onnx directory's own files are not companions of what is read back from it
    assert not {"model.onnx", "model.onnx.data", "genai_config.json"} & set(convcore.load(mid).companions)


# what is and is not a companion --------------------------------------------------------------
def test_weights_hidden_files_and_other_folders_are_not_companions(decoder):
    (decoder / ".hidden").write_text("x")
    (decoder / "tf_model.h5").write_bytes(b"\0" * 16)
    (decoder / "pytorch_model.bin.index.json").write_text("{}")
    (decoder / "onnx").mkdir()
    (decoder / "onnx" / "model.onnx").write_bytes(b"\0")
    (decoder / "2_Dense").mkdir()
    (decoder / "2_Dense" / "config.json").write_text("{}")
    (decoder / "2_Dense" / "model.safetensors").write_bytes(b"dense")  # the module's own state
    (decoder / "NOTICE").write_text("notice\n")
    got = convcore.read_companions(decoder)
    assert sorted(got) == ["1_Pooling/config.json", "2_Dense/config.json", "2_Dense/model.safetensors",
                           "LICENSE", "NOTICE", "README.md"]


def test_symlinks_out_of_the_directory_are_not_followed(decoder, tmp_path, capfd):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    os.symlink(outside / "secret.txt", decoder / "NOTICE")
    os.symlink(outside, decoder / "3_Linked")
    os.symlink("README.md", decoder / "README_COPY.md")  # inside: read
    got = convcore.read_companions(decoder)
    assert "NOTICE" not in got and not any(k.startswith("3_Linked") for k in got)
    assert got["README_COPY.md"] == (decoder / "README.md").read_bytes()
    err = capfd.readouterr().err
    assert "NOTICE" in err and "outside the model directory" in err


def test_hub_cache_snapshot_companions_are_read(decoder, tmp_path):
    repo = tmp_path / "hub" / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in sorted(decoder.rglob("*")):
        if p.is_file():
            rel = p.relative_to(decoder)
            blob = blobs / f"blob{len(list(blobs.iterdir()))}"
            shutil.copyfile(p, blob)
            (snap / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(blob, (snap / rel).parent), snap / rel)
    out = convcore.convert(snap, tmp_path / "out", to="hf", dtype="f16")
    src = files(decoder)
    for name in DECODER_COMPANIONS:
        assert (out / name).read_bytes() == src[name], name


def test_an_oversized_file_is_skipped_with_a_warning(decoder, tmp_path, capfd):
    big = decoder / "big.dat"
    with open(big, "wb") as f:
        f.truncate(COMPANION_MAX_BYTES + 1)
    out = convcore.convert(decoder, tmp_path / "out", to="hf")
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "big.dat" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: "), err
    assert "not carried over" in lines[0]
    assert not (out / "big.dat").exists()
    assert (out / "README.md").read_bytes() == (decoder / "README.md").read_bytes()


# writing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["../evil", "/tmp/evil", "a/../../evil", "a\\evil", "C:evil", "", "a//b"])
def test_write_companions_refuses_unsafe_names(tmp_path, bad):
    out = tmp_path / "out"
    out.mkdir()
    model = convcore.Model(arch="llama", config={}, tensors={},
                           companions={"README.md": b"card", bad: b"pwned"})
    with pytest.raises(convcore.ConvcoreError) as exc:
        convcore.write_companions(out, model)
    message = str(exc.value)
    assert "\n" not in message and repr(bad) in message
    assert list(out.iterdir()) == []  # checked before anything is written
    assert not (tmp_path / "evil").exists()


def test_write_companions_creates_folders_and_keeps_the_writers_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    model = convcore.Model(arch="llama", config={}, tensors={}, companions={
        "1_Pooling/config.json": b"{}", "a/b/c.txt": b"c", "config.json": b"not mine"})
    convcore.write_companions(out, model)
    assert (out / "1_Pooling" / "config.json").read_bytes() == b"{}"
    assert (out / "a" / "b" / "c.txt").read_bytes() == b"c"
    assert (out / "config.json").read_text() == "{}"


def test_force_replaces_a_previous_output_with_companions(run_cli, encoder, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(encoder, src)
    for name in ("LICENSE.txt", "NOTICE", "USE_POLICY.md"):
        (src / name).write_text(f"{name}\n")
    (src / "2_Dense").mkdir()
    (src / "2_Dense" / "config.json").write_text("{}")
    dst = tmp_path / "out"
    first = run_cli("run", src, "-o", dst, "--to", "hf", "--dtype", "f16", "-q")
    assert first.returncode == 0, first.stderr
    assert carried(dst) == carried(src)
    again = run_cli("run", src, "-o", dst, "--to", "hf", "--force", "-q")
    assert again.returncode == 0, again.stderr
    assert carried(dst) == carried(src)
    assert convcore.load(dst).tensors["embeddings.word_embeddings.weight"].dtype == "f32"
