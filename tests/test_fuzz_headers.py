"""Property-based fuzzing of the loaders' header parsing: whatever bytes a model file
holds, loading it and reading its tensors gives a model or a one-line convcore error,
never another exception. Bounded here (``FUZZ_EXAMPLES``, default 150 per loader) so
``make test`` stays quick; ``CONVCORE_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz_headers.py``
runs longer."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import convcore  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("CONVCORE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def valid_safetensors() -> bytes:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.ones(5, dtype=np.float16)
    header = {"__metadata__": {"format": "pt"},
              "model.embed_tokens.weight": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
              "model.norm.weight": {"dtype": "F16", "shape": [5], "data_offsets": [48, 58]}}
    return safetensors_bytes(header, a.tobytes() + b.tobytes())


def read_everything(path: Path, fmt: str | None = None) -> None:
    """Load (headers) and read every tensor; only ConvcoreError may come out."""
    try:
        model = convcore.get_registry().load(path, fmt)
        for ref in model.tensors.values():
            ref.load()
    except convcore.ConvcoreError as exc:
        assert "\n" not in str(exc).strip()


def model_dir(tmp_path: Path, payload: bytes) -> Path:
    d = tmp_path / "m"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (d / "model.safetensors").write_bytes(payload)
    return d


@FUZZ
@given(data=st.data())
def test_safetensors_bytes_mutated(tmp_path, data):
    good = bytearray(valid_safetensors())
    action = data.draw(st.sampled_from(["truncate", "flip", "splice"]))
    if action == "truncate":
        good = good[:data.draw(st.integers(0, len(good) - 1))]
    elif action == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(good) - 1))
            good[i] = data.draw(st.integers(0, 255))
    else:
        i = data.draw(st.integers(0, len(good)))
        good[i:i] = data.draw(st.binary(max_size=64))
    read_everything(model_dir(tmp_path, bytes(good)), "hf")


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=True), st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
entries = st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "F8_E4M3", "Q4", ""]), json_values),
    "shape": st.one_of(st.lists(st.integers(-3, 2**40), max_size=4), json_values),
    "data_offsets": st.one_of(st.lists(st.integers(-10, 2**62), min_size=2, max_size=2), json_values),
})


@FUZZ
@given(header=st.dictionaries(st.text(min_size=1, max_size=20), st.one_of(entries, json_values), max_size=4),
       data=st.binary(max_size=128))
def test_safetensors_headers_generated(tmp_path, header, data):
    """Declared sizes, shapes and offsets of any kind: never allocated, never a crash."""
    read_everything(model_dir(tmp_path, safetensors_bytes(header, data)), "hf")


_GGUF: list[bytes] = []


def small_gguf() -> bytes:
    """The tiny llama as a q8_0 GGUF, built once (not a fixture: hypothesis would print
    its 2 MB in a failure report)."""
    if not _GGUF:
        pytest.importorskip("conv_gguf")
        import tempfile
        from convcore.testing.models import tiny_model

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "m.gguf"
            convcore.convert(tiny_model("llama"), out, to="gguf", quant="q8_0")
            _GGUF.append(out.read_bytes())
    return _GGUF[0]


#: a GGUF parse builds the vocabulary too, so fewer examples keep it as quick as the rest
GGUF_FUZZ = settings(FUZZ, max_examples=max(10, FUZZ_EXAMPLES // 5))


@GGUF_FUZZ
@given(data=st.data())
def test_gguf_bytes_mutated(tmp_path, data):
    good = bytearray(small_gguf())
    # the header and tensor infos are in the first part of the file; aim there mostly
    head = min(len(good), 1 << 16)
    action = data.draw(st.sampled_from(["truncate", "flip", "flip", "int"]))
    if action == "truncate":
        good = good[:data.draw(st.integers(0, len(good) - 1))]
    elif action == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, head - 1))
            good[i] = data.draw(st.integers(0, 255))
    else:  # a count, length or offset made huge or negative
        i = data.draw(st.integers(0, head - 8))
        good[i:i + 8] = struct.pack("<q", data.draw(st.sampled_from([-1, 2**31, 2**40, 2**62, -2**63])))
    path = tmp_path / "m.gguf"
    path.write_bytes(bytes(good))
    read_everything(path, "gguf")


_OUTPUTS: dict[str, Path] = {}
_TARGETS = {"mlx": "int4-g64", "parquet": "int8-row", "npz": "int8-row", "onnx": "int4-b32"}
_DATA_SUFFIXES = (".safetensors", ".json", ".npz", ".onnx", ".data", ".parquet")


def converted(fmt: str) -> Path:
    """The tiny llama in ``fmt``, built once per session."""
    if fmt not in _OUTPUTS:
        import tempfile
        from convcore.testing.models import tiny_model

        if fmt not in convcore.get_registry().formats:
            pytest.skip(f"no {fmt} plugin")
        out = Path(tempfile.mkdtemp(prefix=f"fuzz-{fmt}-")) / ("m.parquet" if fmt == "parquet" else "m")
        convcore.convert(tiny_model("llama"), out, to=fmt, quant=_TARGETS[fmt])
        _OUTPUTS[fmt] = out
    return _OUTPUTS[fmt]


@pytest.mark.parametrize("fmt", sorted(_TARGETS))
def test_other_formats_mutated(tmp_path, fmt):
    """One file of an mlx, parquet, npz or onnx output truncated or with flipped bytes
    (weights, index, manifest, config, graph, external data): a model or one line."""
    import shutil

    good = converted(fmt)

    @GGUF_FUZZ
    @given(data=st.data())
    def check(data):
        case = tmp_path / "case"
        shutil.rmtree(case, ignore_errors=True)
        case.mkdir()
        if good.is_file():
            target = victim = case / good.name
            shutil.copy(good, target)
        else:
            target = case / good.name
            shutil.copytree(good, target)
            files = sorted(p.relative_to(good) for p in good.rglob("*") if p.suffix in _DATA_SUFFIXES)
            victim = target / data.draw(st.sampled_from(files))
        raw = bytearray(victim.read_bytes())
        if data.draw(st.booleans()):
            raw = raw[:data.draw(st.integers(0, max(0, len(raw) - 1)))]
        else:
            for _ in range(data.draw(st.integers(1, 8))):
                raw[data.draw(st.integers(0, min(len(raw), 1 << 16) - 1))] = data.draw(st.integers(0, 255))
        victim.write_bytes(bytes(raw))
        read_everything(target, fmt)

    check()
