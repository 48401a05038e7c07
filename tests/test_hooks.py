"""One test per hook (enforced), each through a real plugin, plus docs completeness."""
from __future__ import annotations

import inspect
import re
import types
from pathlib import Path

import numpy as np
import pytest

import convcore
from convcore import hookspecs

ROOT = Path(__file__).resolve().parents[1]
HOOKS = sorted(n for n in dir(hookspecs) if n.startswith("convcore_"))


def make_plugin(**impls):
    module = types.ModuleType("testplugin")
    for name, fn in impls.items():
        setattr(module, name, convcore.hookimpl(fn))
    return module


def row_sum_scheme():
    """A toy scheme: each row stored as its float16 values (lossy, checkable)."""
    return convcore.Scheme(
        name="f16-rows", block_size=4, bits=16.0,
        quantize=lambda a: {"q": np.asarray(a, np.float32).astype(np.float16)},
        dequantize=lambda data, shape: data["q"].astype(np.float32).reshape(shape))


def test_every_hook_has_a_test():
    names = {n for n, _ in inspect.getmembers(__import__(__name__), inspect.isfunction)}
    for path in ROOT.glob("tests/test_*.py"):
        names |= set(re.findall(r"^def (test_hook_\w+)", path.read_text(), re.M))
    missing = [h for h in HOOKS if f"test_hook_{h}" not in names]
    assert missing == []


def test_every_hook_is_documented_with_its_signature():
    docs = (ROOT / "docs" / "plugins.md").read_text()
    for name in HOOKS:
        spec = getattr(hookspecs, name)
        args = ", ".join(inspect.signature(spec).parameters)
        assert f"{name}({args})" in docs, name
        assert spec.__doc__ and ":return:" in spec.__doc__, name


def test_hook_convcore_register_formats():
    registry = convcore.Registry(load_entry_points=False, plugins=(make_plugin(
        convcore_register_formats=lambda register: register(convcore.Format(name="toy"))),))
    assert registry.formats["toy"].plugin == "testplugin"
    assert registry.infos["testplugin"].formats == ["toy"]


def test_hook_convcore_register_schemes():
    registry = convcore.Registry(load_entry_points=False, plugins=(make_plugin(
        convcore_register_schemes=lambda register: register(row_sum_scheme())),))
    assert registry.scheme("f16-rows").plugin == "testplugin"
    with pytest.raises(convcore.ConvcoreError, match="pip install quant-rowwise"):
        registry.scheme("q9_9")


def test_hook_convcore_quantize():
    registry = convcore.Registry(load_entry_points=False, plugins=(make_plugin(
        convcore_register_schemes=lambda register: register(row_sum_scheme())),))
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    qt = convcore.quantize(x, "f16-rows", registry=registry)
    assert qt.scheme == "f16-rows" and qt.shape == (3, 8)
    np.testing.assert_array_equal(qt.dequantize(), x.astype(np.float16).astype(np.float32))
    with pytest.raises(convcore.ConvcoreError, match="row length 6 is not a multiple"):
        convcore.quantize(x[:, :6], "f16-rows", registry=registry)
    with pytest.raises(convcore.ConvcoreError, match="cannot quantize i32"):
        convcore.quantize(x.astype(np.int32), "f16-rows", registry=registry)


def test_hook_convcore_load(tiny_llama):
    model = convcore.get_registry().load(tiny_llama)
    assert model.format == "hf" and len(model.tensors) == 21
    assert model.config["hidden_size"] == 256 and "tokenizer.model" in model.tokenizer


def test_hook_convcore_map_names(tiny_llama):
    model = convcore.load(tiny_llama)
    registry = convcore.Registry(load_entry_points=False, plugins=(make_plugin(
        convcore_map_names=lambda model, target: {n: n.upper() for n in model.tensors}
        if target == "toy" else None),))
    mapping = registry.map_names(model, "toy")
    assert mapping["model.norm.weight"] == "MODEL.NORM.WEIGHT" and len(mapping) == 21
    assert registry.map_names(model, "other") == {}


def test_hook_convcore_write(tiny_llama, tmp_path):
    seen = []
    out = convcore.get_registry().write(convcore.load(tiny_llama), tmp_path / "o", "hf",
                                        {"dtype": "bf16"}, seen.append)
    assert len(seen) == 21 and (out / "model.safetensors").exists()
    assert {r.dtype for r in convcore.load(out).tensors.values()} == {"bf16"}


def test_hook_convcore_validate(tiny_llama, tmp_path):
    registry = convcore.get_registry()
    assert registry.validate(tiny_llama) == []
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text("{not json")
    (tmp_path / "cfg" / "model.safetensors").write_bytes(b"\x00" * 4)
    problems = registry.validate(tmp_path / "cfg", "hf")
    assert len(problems) == 1 and "not valid JSON" in problems[0]


def test_hook_convcore_infer(tiny_llama):
    logits = convcore.get_registry().infer(tiny_llama, [1, 2, 3])
    assert logits.shape == (3, 1024) and logits.dtype == np.float32
    assert np.isfinite(logits).all() and logits.std() > 0


def test_ordered_map_keeps_order_bound_and_registry():
    """Results come in input order, and worker threads see the registry in use."""
    import threading

    registry = convcore.Registry(load_entry_points=False)
    seen = []

    def work(i):
        seen.append(convcore.get_registry() is registry)
        return i * i, threading.get_ident()

    with convcore.using(registry):
        out = list(convcore.ordered_map(work, range(20), jobs=3))
    assert [r for r, _ in out] == [i * i for i in range(20)]
    assert all(seen) and len(seen) == 20
    assert len({t for _, t in out}) > 1  # really ran on several threads
