"""conv-gguf's architectures are a registry others extend: a separately installed
distribution adds a model_type through ``conv_gguf_register_archs``."""
from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import types
from pathlib import Path

import gguf
import numpy as np
import pytest

import convcore
import conv_gguf
from conv_gguf import arch_table, hookspecs
from convcore.testing.distributions import pip_install, write_plugin

HERE = Path(__file__).resolve().parent
CUSTOM = "tinyllama-custom"
CUSTOM_PLUGIN = f"""
import convcore
import conv_gguf

# optionalhook: the package still loads where conv-gguf is disabled
@convcore.hookimpl(optionalhook=True)
def conv_gguf_register_archs(register):
    register(conv_gguf.BUILTIN_ARCHS["llama"].alias({CUSTOM!r}))
"""
DUPLICATE_PLUGIN = """
import convcore
import conv_gguf

@convcore.hookimpl
def conv_gguf_register_archs(register):
    register(conv_gguf.BUILTIN_ARCHS["qwen2"].alias("llama"))
"""


@pytest.fixture(scope="module")
def custom_site(tmp_path_factory) -> Path:
    """A site dir holding a pip-installed distribution that registers a llama under
    model_type "tinyllama-custom"."""
    site = tmp_path_factory.mktemp("site-archs")
    src = tmp_path_factory.mktemp("archs-src")
    pip_install(write_plugin(src, "convcore-tinyllama-custom", "convcore_tinyllama_custom",
                             "tinyllama-custom", CUSTOM_PLUGIN, dependencies=["conv-gguf"]), site)
    return site


@pytest.fixture(scope="module")
def custom_model(tiny_model_factory, tmp_path_factory) -> Path:
    """The tiny llama with config.json saying model_type "tinyllama-custom"."""
    src = tmp_path_factory.mktemp("custom") / "tinyllama-custom"
    shutil.copytree(tiny_model_factory("llama"), src)
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = CUSTOM
    (src / "config.json").write_text(json.dumps(config))
    return src


def env_with(*sites: Path, **extra: str) -> dict:
    """The environment of a child ``convcore`` that sees the plugins in ``sites``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVCORE_")}
    env["PYTHONPATH"] = os.pathsep.join(str(s) for s in sites)
    env.update(extra)
    return env


def gguf_tensors(path: Path) -> dict[str, tuple[int, bytes]]:
    return {t.name: (int(t.tensor_type), bytes(t.data.tobytes())) for t in gguf.GGUFReader(path).tensors}


def test_hook_conv_gguf_register_archs(custom_site, custom_model, tiny_model_factory, run_cli, tmp_path):
    """Without the plugin the model_type is refused; with it the model converts to the
    GGUF the same weights give as a llama, and reads back as a llama."""
    dst = tmp_path / "custom.gguf"
    refused = run_cli("run", custom_model, "-o", dst, "--to", "gguf", env=env_with())
    assert refused.returncode != 0 and not dst.exists()
    assert refused.stderr.count("\n") == 1 and f"architecture {CUSTOM!r} is not supported" in refused.stderr

    result = run_cli("run", custom_model, "-o", dst, "--to", "gguf", "--quant", "f16", "-q",
                     env=env_with(custom_site))
    assert result.returncode == 0, result.stderr
    fields = gguf.GGUFReader(dst).fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.model"].contents() == "llama"

    plain = convcore.convert(tiny_model_factory("llama"), tmp_path / "llama.gguf", to="gguf", quant="f16")
    ours, llama = gguf_tensors(dst), gguf_tensors(plain)
    assert list(ours) == list(llama)     # same names in the same order
    assert "blk.1.attn_q.weight" in ours and "token_embd.weight" in ours
    assert ours == llama                 # and the same types and bytes (q/k permuted as llama)

    back = convcore.load(dst)
    assert back.arch == "llama" and back.config["model_type"] == "llama"

    listed = run_cli("plugins", "--json", env=env_with(custom_site))
    assert listed.returncode == 0, listed.stderr
    row = {p["name"]: p for p in json.loads(listed.stdout)}[CUSTOM]
    assert "conv_gguf_register_archs" in row["hooks"] and not row.get("error")


def test_plugin_loads_where_conv_gguf_is_disabled(custom_site, run_cli):
    result = run_cli("formats", "--json", env=env_with(custom_site, CONVCORE_DISABLE_PLUGINS="gguf"))
    assert result.returncode == 0, result.stderr
    formats = {row["format"] for row in json.loads(result.stdout)}
    assert "hf" in formats and "gguf" not in formats


@pytest.mark.llamacpp
def test_custom_model_type_runs_in_llama_cpp(custom_site, custom_model, tiny_model_factory, run_cli, tmp_path):
    dst = tmp_path / "custom-f32.gguf"
    result = run_cli("run", custom_model, "-o", dst, "--to", "gguf", "--quant", "f32", "-q",
                     env=env_with(custom_site))
    assert result.returncode == 0, result.stderr
    plain = convcore.convert(tiny_model_factory("llama"), tmp_path / "llama-f32.gguf", to="gguf", quant="f32")
    ids = [1, 20, 30, 400, 5]
    registry = convcore.get_registry()
    got = registry.infer(dst, ids, "gguf")
    assert got.shape == (5, 1024) and np.isfinite(got).all()
    np.testing.assert_array_equal(got, registry.infer(plain, ids, "gguf"))


def test_duplicate_model_type_names_both_plugins(tmp_path_factory, tiny_llama, run_cli, tmp_path):
    site = tmp_path_factory.mktemp("site-dup-arch")
    src = tmp_path_factory.mktemp("dup-arch-src")
    pip_install(write_plugin(src, "convcore-dup-arch", "convcore_dup_arch", "dup-arch",
                             DUPLICATE_PLUGIN, dependencies=["conv-gguf"]), site)
    result = run_cli("run", tiny_llama, "-o", tmp_path / "x.gguf", "--to", "gguf", env=env_with(site))
    assert result.returncode != 0 and not (tmp_path / "x.gguf").exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "model_type 'llama' is registered by both plugin" in lines[0]
    assert "'gguf'" in lines[0] and "'dup-arch'" in lines[0]


def _registry_with(**impls) -> convcore.Registry:
    module = types.ModuleType("archplugin")
    for name, fn in impls.items():
        setattr(module, name, convcore.hookimpl(fn))
    return convcore.Registry(plugins=(module,))


def test_arch_tables_are_per_registry():
    extended = _registry_with(conv_gguf_register_archs=lambda register: register(
        conv_gguf.BUILTIN_ARCHS["qwen2"].alias("qwen2-custom")))
    assert "qwen2-custom" in conv_gguf.registered_archs(extended)
    assert "qwen2-custom" not in conv_gguf.registered_archs()
    assert arch_table.registered(extended).plugins["qwen2-custom"] == "archplugin"
    assert arch_table.read_back(extended)["qwen2"].model_type == "qwen2"


@pytest.mark.parametrize("register_with,fragments", [
    (lambda register: register({"model_type": "x"}), ["plugin 'archplugin' passed a dict"]),
    (lambda register: 1 / 0, ["plugin 'archplugin' failed in conv_gguf_register_archs: ZeroDivisionError"]),
    (lambda register: register(conv_gguf.Arch("llama-twin", "llama", "LlamaForCausalLM", {})),
     ["GGUF architecture 'llama' would read back as both", "'llama' (plugin 'gguf')",
      "'llama-twin' (plugin 'archplugin')", "Arch.alias()"]),
])
def test_bad_registrations_are_one_line_errors(register_with, fragments):
    registry = _registry_with(conv_gguf_register_archs=register_with)
    with pytest.raises(convcore.ConvcoreError) as err:
        arch_table.read_back(registry)
    message = str(err.value)
    assert "\n" not in message
    assert all(f in message for f in fragments), message


def test_every_conv_gguf_hook_is_tested_and_documented():
    specs = {n: f for n, f in inspect.getmembers(hookspecs, inspect.isfunction)
             if n.startswith("conv_gguf_")}
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
