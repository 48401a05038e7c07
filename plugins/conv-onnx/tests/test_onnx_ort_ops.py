"""validate knows onnxruntime's own operators: where onnx.checker has no schema for one
(SimplifiedLayerNormalization in the default domain, com.microsoft's), onnxruntime builds a
session of the graph instead; an operator nobody knows is still one line."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conv_onnx.validate import check_graph

pytest.importorskip("onnxruntime")


def graph(path: Path, op: str, domain: str = "") -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    scale = numpy_helper.from_array(np.ones(4, np.float32), "scale")
    node = helper.make_node(op, ["x", "scale"], ["y"], domain=domain, epsilon=1e-6, axis=-1)
    opsets = [helper.make_opsetid("", 21)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(helper.make_graph([node], "g", [x], [y], [scale]), opset_imports=opsets)
    model.ir_version = 10
    onnx.save(model, path)
    return path


def test_onnxruntimes_own_operator_is_valid(tmp_path: Path) -> None:
    file = graph(tmp_path / "m.onnx", "SimplifiedLayerNormalization")
    with pytest.raises(onnx.checker.ValidationError, match="No Op registered"):
        onnx.checker.check_model(str(file))   # what validate said before
    assert check_graph(file) == []


def test_an_operator_nobody_knows_is_one_line(tmp_path: Path) -> None:
    file = graph(tmp_path / "m.onnx", "NoSuchNormalization")
    problems = check_graph(file)
    assert len(problems) == 1 and problems[0].startswith(f"{file}: onnxruntime cannot load it: ")
    assert "NoSuchNormalization" in problems[0] and "\n" not in problems[0]


def test_validate_takes_several_paths(tmp_path: Path, run_cli, tiny_llama) -> None:
    import convcore

    good = tmp_path / "good"
    convcore.convert(tiny_llama, good, "hf")
    r = run_cli("validate", good, tmp_path / "missing", good)
    assert r.returncode == 1
    assert r.stdout.splitlines() == [f"{good}: valid", f"{good}: valid"]
    assert r.stderr.splitlines() == [f"invalid: {tmp_path / 'missing'}: no such file or directory"]
    assert run_cli("validate", good, good).returncode == 0
