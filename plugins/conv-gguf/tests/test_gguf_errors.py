"""Broken GGUF files give one-line errors naming the file: no crash, no huge allocation."""
from __future__ import annotations

import resource
import struct

import pytest

import convcore
from convcore import ConvcoreError


def _patch(data: bytes, at: int, fmt: str, value: int) -> bytes:
    size = struct.calcsize(fmt)
    return data[:at] + struct.pack(fmt, value) + data[at + size:]


def _tensor_offset_field(data: bytes, name: bytes) -> int:
    """Byte position of the data-offset field in tensor ``name``'s info record."""
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    return at + 4 + 8 * n_dims + 4


def _array_length_field(data: bytes, key: bytes) -> int:
    return data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key) + 4 + 4


def _cases(good: bytes) -> dict[str, bytes]:
    return {
        "empty": b"",
        "wrong magic": b"GGML" + good[4:],
        "truncated header": good[:4000],
        "truncated data": good[:len(good) - 1000],
        "absurd tensor count": _patch(good, 8, "<Q", 2**62),
        "absurd kv count": _patch(good, 16, "<Q", 2**61),
        "absurd array length": _patch(good, _array_length_field(good, b"tokenizer.ggml.tokens"),
                                      "<Q", 2**60),
        "offset past the end": _patch(good, _tensor_offset_field(good, b"output.weight"),
                                      "<Q", 2**40),
        "bad version": _patch(good, 4, "<I", 99),
        # llama.cpp's token types are 0..6; a tensor name its architecture does not have
        "token type out of range": _patch(good, _array_length_field(good, b"tokenizer.ggml.token_type") + 8
                                          + 4 * 5, "<i", 99),
        "tensor of another architecture": good.replace(b"blk.0.attn_q.weight", b"blk.0.attn_x.weight", 1),
    }


@pytest.fixture(scope="module")
def bad_files(converted, tmp_path_factory):
    good = converted("llama", "f16").read_bytes()
    root = tmp_path_factory.mktemp("bad")
    files = {}
    for i, (case, data) in enumerate(_cases(good).items()):
        files[case] = root / f"bad{i}.gguf"
        files[case].write_bytes(data)
    return files


CASES = ["empty", "wrong magic", "truncated header", "truncated data", "absurd tensor count",
         "absurd kv count", "absurd array length", "offset past the end", "bad version",
         "token type out of range", "tensor of another architecture"]


# llama.cpp maps a token type it does not know to "undefined" and runs the model; the
# reader cannot rebuild a SentencePiece model with it, and validate calls it damaged
LLAMA_CPP_RUNS = {"token type out of range"}


@pytest.mark.parametrize("case", CASES)
def test_gguf_bad_file_load_is_one_line_error(case, bad_files):
    path = bad_files[case]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ConvcoreError) as err:
        convcore.load(path, "gguf")
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kb < 200_000, f"{case}: peak RSS grew by {grown_kb} kB"
    problems = convcore.get_registry().validate(path, "gguf")
    assert problems and all(str(path) in p and "\n" not in p for p in problems)
    if case in LLAMA_CPP_RUNS:
        return
    with pytest.raises(ConvcoreError):
        convcore.get_registry().infer(path, [1, 2, 3], "gguf")


@pytest.mark.parametrize("case, problem", [
    ("token type out of range", "tokenizer.ggml.token_type of token 5 is 99; llama.cpp's token types are 0..6"),
    ("tensor of another architecture", "tensor 'blk.0.attn_x.weight' is not a tensor of architecture llama (gguf's MODEL_TENSORS)"),
])
def test_gguf_validate_reads_what_loading_reads(case, problem, bad_files):
    """validate decodes the vocabulary and checks tensor names as llama.cpp would, so a
    file loading refuses for them is invalid too, with the reason."""
    path = bad_files[case]
    assert convcore.get_registry().validate(path, "gguf") == [f"{path}: {problem}"]


def test_gguf_bad_file_cli(bad_files, run_cli, tmp_path):
    path = bad_files["offset past the end"]
    result = run_cli("validate", path, "--format", "gguf")
    assert result.returncode != 0
    result = run_cli("run", path, "--from", "gguf", "-o", tmp_path / "out", "--to", "hf")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(path) in lines[0]
    assert not (tmp_path / "out").exists()


def test_gguf_good_file_validates(converted):
    assert convcore.get_registry().validate(converted("llama", "f16"), "gguf") == []


def test_gguf_kquant_needs_scheme_or_works(tiny_model_factory, tmp_path):
    """Without a plugin providing q4_k the error names the package and nothing is left
    behind; with one, the conversion succeeds."""
    dst = tmp_path / "k.gguf"
    if "q4_k" in convcore.get_registry().schemes:
        assert convcore.convert(tiny_model_factory("llama"), dst, to="gguf", quant="q4_k_m").exists()
        return
    with pytest.raises(ConvcoreError, match="quant-rowwise"):
        convcore.convert(tiny_model_factory("llama"), dst, to="gguf", quant="q4_k_m")
    assert list(tmp_path.iterdir()) == []


def _edited_copy(src, dst, **changes):
    import json
    import shutil
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_gguf_missing_hparam_fails_validation(tiny_model_factory, tmp_path):
    """A config without max_position_embeddings gives a GGUF without context_length,
    which validation catches before the file is put in place."""
    src = _edited_copy(tiny_model_factory("llama"), tmp_path / "src", max_position_embeddings=None)
    with pytest.raises(ConvcoreError, match="missing key llama.context_length"):
        convcore.convert(src, tmp_path / "x.gguf", to="gguf")
    assert not (tmp_path / "x.gguf").exists()
