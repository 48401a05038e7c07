"""A plugin written to the first plugin contract (docs/plugins.md as it was: positional
``Scheme(name, quantize, dequantize, block_size, bits)``, ``quantize(array)``, no layout,
``Format`` with no options) still registers, converts and reads back, with a deprecation
note naming the plugin and what to change."""
from __future__ import annotations

import types
import warnings

import numpy as np
import pytest

import convcore
from convcore.testing.models import tiny_model


def contract1_plugin() -> types.ModuleType:
    """The rows-in-f16 scheme and an .npy-directory format, as a plugin of contract 1."""
    module = types.ModuleType("oldplugin")

    def quantize(array):            # contract 1: no options
        return {"q": np.asarray(array, np.float32).astype(np.float16)}

    def dequantize(data, shape):
        return data["q"].astype(np.float32).reshape(shape)

    def convcore_register_schemes(register):
        register(convcore.Scheme("old-f16", quantize, dequantize, 4, 16.0))   # positional, no layout

    def convcore_register_formats(register):
        register(convcore.Format(name="oldnpy", description="one .npy per tensor", directory=True,
                                 schemes=("old-f16",)))

    def convcore_write(model, path, fmt, options, progress):
        if fmt != "oldnpy":
            return None
        path.mkdir()
        for name, ref in model.tensors.items():
            array = ref.load()
            if options.get("quant") and array.ndim == 2:
                array = convcore.quantize(ref, options["quant"]).dequantize()
            np.save(path / f"{name}.npy", np.asarray(array, np.float32))
            progress(name)
        return path

    for name, fn in (("convcore_register_schemes", convcore_register_schemes),
                     ("convcore_register_formats", convcore_register_formats),
                     ("convcore_write", convcore_write)):
        setattr(module, name, convcore.hookimpl(fn))
    return module


def test_contract1_plugin_registers_and_converts(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry = convcore.Registry(load_entry_points=False, plugins=(contract1_plugin(),))
    scheme = registry.schemes["old-f16"]
    assert (scheme.block_size, scheme.bits, scheme.layout) == (4, 16.0, None)
    info = next(i for i in registry.infos.values() if "old-f16" in i.schemes)
    assert not info.error
    assert any("quantize(array) is contract 1" in d for d in info.deprecations)
    assert any("block_size given in layout's place" in d for d in info.deprecations)
    assert any(issubclass(w.category, DeprecationWarning) and info.name in str(w.message) for w in caught)

    src = tiny_model("llama")
    with convcore.using(registry):
        out = convcore.convert(src, tmp_path / "out", to="oldnpy", quant="old-f16")
    name = "model.layers.0.self_attn.q_proj.weight"
    want = convcore.load(src).tensors[name].load().astype(np.float16).astype(np.float32)
    assert np.array_equal(np.load(out / f"{name}.npy"), want)


def test_scheme_keywords_of_contract1_keep_their_fields():
    """Scheme(name, q, dq, 32, bits=4.5): only block_size sat in layout's place."""
    s = convcore.Scheme("k", lambda a: {}, lambda d, s: None, 32, bits=4.5, family="toy")
    assert (s.block_size, s.bits, s.family, s.layout) == (32, 4.5, "toy", None)
    current = convcore.Scheme("c", lambda a, o: {}, lambda d, s: None, layout=lambda s, d: {}, block_size=8)
    assert current.legacy == () and current.block_size == 8


def test_plugins_command_shows_the_contract(run_cli):
    out = run_cli("plugins").stdout
    assert f"plugin contract {convcore.CONTRACT}" in out


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_formats_json_lists_outputs(run_cli, fmt):
    import json
    shown = json.loads(run_cli("formats", fmt, "--json").stdout)
    assert shown["outputs"] == list(convcore.get_registry().format(fmt).outputs)
