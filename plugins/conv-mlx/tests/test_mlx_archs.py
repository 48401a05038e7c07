"""conv-mlx's architectures are a registry others extend through ``conv_mlx_register_archs``."""
from __future__ import annotations

import inspect
import json
import re
import shutil
import types
from pathlib import Path

import pytest

import convcore
import conv_mlx
from conv_mlx import archs, hookspecs
from mlx_helpers import raw_tensors

HERE = Path(__file__).resolve().parent


def registry_with(register_archs) -> convcore.Registry:
    module = types.ModuleType("mlxarchplugin")
    module.conv_mlx_register_archs = convcore.hookimpl(register_archs)
    return convcore.Registry(plugins=(module,))


@pytest.fixture(scope="module")
def custom_model(tiny_model_factory, tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("custom") / "src"
    shutil.copytree(tiny_model_factory("llama"), src)
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "tinyllama-custom"
    (src / "config.json").write_text(json.dumps(config))
    return src


def test_hook_conv_mlx_register_archs(custom_model, tiny_model_factory, tmp_path):
    """A model_type only a plugin knows is written as the architecture it aliases."""
    with pytest.raises(convcore.ConvcoreError, match="architecture 'tinyllama-custom' is not supported"):
        convcore.convert(custom_model, tmp_path / "refused", to="mlx", quant="f16")
    registry = registry_with(lambda register: register(
        conv_mlx.BUILTIN_ARCHS["llama"].alias("tinyllama-custom")))
    ours = convcore.convert(custom_model, tmp_path / "custom", to="mlx", quant="f16", registry=registry)
    plain = convcore.convert(tiny_model_factory("llama"), tmp_path / "llama", to="mlx", quant="f16")
    assert raw_tensors(ours) == raw_tensors(plain)
    assert json.loads((ours / "config.json").read_text())["model_type"] == "tinyllama-custom"
    assert archs.registered(registry).plugins["tinyllama-custom"] == "mlxarchplugin"
    assert "tinyllama-custom" not in archs.registered().items


def test_duplicate_mlx_model_type_names_both_plugins():
    registry = registry_with(lambda register: register(archs.ArchRules("qwen2", tie_default=False)))
    with pytest.raises(convcore.ConvcoreError) as err:
        archs.rules_for("qwen2", registry)
    message = str(err.value)
    assert "model_type 'qwen2' is registered by both plugin" in message and "\n" not in message
    assert "'mlxarchplugin'" in message and "'mlx'" in message


def test_every_conv_mlx_hook_is_tested_and_documented():
    specs = {n: f for n, f in inspect.getmembers(hookspecs, inspect.isfunction)
             if n.startswith("conv_mlx_")}
    assert specs
    tests = set()
    for path in HERE.glob("test_*.py"):
        tests |= set(re.findall(r"^def (test_hook_\w+)", path.read_text(), re.M))
    readme = (HERE.parent / "README.md").read_text()
    for name, spec in specs.items():
        assert f"test_hook_{name}" in tests, name
        args = ", ".join(inspect.signature(spec).parameters)
        assert f"{name}({args})" in readme, name
        assert spec.__doc__ and ":return:" in spec.__doc__, name
