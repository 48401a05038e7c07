"""Broken ONNX directories: one ``error:`` line naming the file and the fault, exit != 0,
no traceback, no output, the input untouched."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Callable

import onnx
import pytest

import convcore
from onnx_helpers import source


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx-good") / "m"
    convcore.convert(source("qwen2"), out, to="onnx")
    return out


def _edit_proto(path: Path, change: Callable[[onnx.ModelProto], None]) -> None:
    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    change(model)
    (path / "model.onnx").write_bytes(model.SerializeToString())


def _init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _set_ext(t: onnx.TensorProto, key: str, value: str) -> None:
    for e in t.external_data:
        if e.key == key:
            e.value = value


O_PROJ = "model.layers.0.attn.o_proj.MatMul.weight"


def truncated(p: Path) -> None:
    data = (p / "model.onnx").read_bytes()
    (p / "model.onnx").write_bytes(data[: len(data) // 2])


def data_missing(p: Path) -> None:
    (p / "model.onnx.data").unlink()


def data_short(p: Path) -> None:
    with open(p / "model.onnx.data", "r+b") as f:
        f.truncate(f.seek(0, 2) - 4096)


def shape_mismatch(p: Path) -> None:
    """The embedding said to be [1024, 128] with bytes to match: consistent in itself,
    wrong for the model config.json describes."""
    def change(m: onnx.ModelProto) -> None:
        t = _init(m, "model.embed_tokens.weight")
        del t.dims[:]
        t.dims.extend([1024, 128])
        _set_ext(t, "length", str(1024 * 128 * 4))
    _edit_proto(p, change)


def length_mismatch(p: Path) -> None:
    _edit_proto(p, lambda m: _set_ext(_init(m, O_PROJ), "length", "1000"))


def outside(p: Path) -> None:
    (p.parent / "secret.bin").write_bytes(b"\0" * (1 << 20))
    _edit_proto(p, lambda m: _set_ext(_init(m, O_PROJ), "location", "../secret.bin"))


def absolute(p: Path) -> None:
    _edit_proto(p, lambda m: _set_ext(_init(m, O_PROJ), "location", "/etc/passwd"))


CASES = {
    "truncated model.onnx": (truncated, "not a readable ONNX model"),
    "external data missing": (data_missing, "model.onnx.data is missing"),
    "external data short": (data_short, "too short"),
    "initializer shape vs config": (shape_mismatch, "config.json says [1024, 256]"),
    "external length vs shape": (length_mismatch, "external length 1000 bytes"),
    "location outside the directory": (outside, "outside the model directory"),
    "absolute location": (absolute, "outside the model directory"),
}


# a third of the damage in the default tier, all of it in make test-full
@pytest.mark.parametrize("case", [pytest.param(c, marks=() if i % 3 == 0 else pytest.mark.full)
                                  for i, c in enumerate(CASES)])
def test_broken_directory(case: str, good: Path, tmp_path: Path, run_cli) -> None:
    breaker, message = CASES[case]
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    breaker(bad)
    before = tree_hash(tmp_path)
    out = tmp_path / "out"
    for args in (("run", bad, "--to", "hf", "-o", out), ("validate", bad), ("inspect", bad)):
        res = run_cli(*args)
        assert res.returncode != 0, (args, res.stdout)
        lines = [l for l in res.stderr.splitlines() if l.strip()]
        assert "Traceback" not in res.stderr
        if args[0] != "validate":
            assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
            assert message in lines[0] and "bad" in lines[0], lines[0]
        else:
            assert message in res.stdout + res.stderr
    assert not out.exists()
    assert tree_hash(tmp_path) == before


@pytest.mark.parametrize("key,value,message", [
    ("head_size", 32, "head_size 32 but past_key_values.0.key has 64"),
    ("num_hidden_layers", 3, "num_hidden_layers 3, the graph has 2"),
    ("num_key_value_heads", 4, "num_key_value_heads 4 but past_key_values.0.key has 2"),
])
def test_genai_config_disagreeing_with_graph(key: str, value: int, message: str, good: Path,
                                             tmp_path: Path, run_cli) -> None:
    import json
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    gen = json.loads((bad / "genai_config.json").read_text())
    gen["model"]["decoder"][key] = value
    (bad / "genai_config.json").write_text(json.dumps(gen))
    res = run_cli("validate", bad)
    assert res.returncode != 0 and message in res.stdout + res.stderr
