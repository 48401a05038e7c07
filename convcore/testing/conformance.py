"""Conformance checks every format plugin should pass, callable from its own tests:

    from convcore.testing.conformance import check_format
    def test_conformance(tiny_llama, tmp_path):
        check_format("myfmt", tiny_llama, tmp_path)

They drive the real pipeline (no mocks) and check the contract the core promises users:
valid output, detection, HF names restored on reading, lossless f32 round trips where the
format claims them, refusal to overwrite, and no partial output after a failed write.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..model import ConvcoreError, Model
from ..pipeline import convert
from ..registry import Registry, get_registry
from . import tree_digest


def _failing(model: Model, after: int) -> Model:
    """A copy of ``model`` whose tensor number ``after`` fails to load."""
    tensors = {}
    for i, (name, ref) in enumerate(model.tensors.items()):
        if i == after:
            def boom(name=name):
                raise ConvcoreError(f"{name}: simulated read failure")
            ref = ref.with_loader(boom)
        tensors[name] = ref
    return dataclasses.replace(model, tensors=tensors)


def check_format(fmt: str, src: Path, tmp_path: Path, *, lossless: bool = True,
                 registry: Registry | None = None, **convert_kwargs) -> Path:
    """Run the conformance checks for format ``fmt`` on the HF model ``src``; returns the
    converted output. ``lossless``: the format stores f32 exactly and restores HF names,
    so ``hf -> fmt -> hf`` must be bit-exact."""
    registry = registry or get_registry()
    spec = registry.format(fmt)
    for option in spec.options:
        assert option.help, f"option {option.name} of {fmt} has no help line"
    if spec.can_write and not spec.directory:
        assert spec.extensions, f"file format {fmt} declares no extension"
    before = tree_digest(src)
    name = "out" + ("" if spec.directory else (spec.extensions[0] if spec.extensions else f".{fmt}"))
    dst = tmp_path / name
    out = convert(src, dst, fmt, registry=registry, **convert_kwargs)
    assert tree_digest(src) == before, "the source changed"
    assert out.exists(), f"{out} missing after a successful conversion"
    assert registry.validate(out, fmt) == [], "fresh output fails its own validation"
    if spec.can_read:
        assert registry.detect(out) == fmt, f"{out} is not detected as {fmt}"
        a, b = registry.load(src), registry.load(out, fmt)
        assert b.arch == a.arch, (a.arch, b.arch)
        missing = set(a.tensors) - set(b.tensors)
        tied = {"lm_head.weight"} if a.config.get("tie_word_embeddings") else set()
        assert missing <= tied, f"tensors lost: {sorted(missing)[:5]}"
        for tname, ref in b.tensors.items():
            if tname in a.tensors:
                assert tuple(ref.shape) == tuple(a.tensors[tname].shape), tname
        if lossless:
            for tname, ref in a.tensors.items():
                if tname in b.tensors:
                    x, y = ref.load(), b.tensors[tname].load()
                    assert np.array_equal(x.astype(np.float32), y.astype(np.float32)), tname
    # Existing output is refused, and left as it was.
    digest = tree_digest(out.parent) if out.parent != tmp_path else None
    try:
        convert(src, dst, fmt, registry=registry, **convert_kwargs)
    except ConvcoreError as exc:
        assert "already exists" in str(exc)
    else:
        raise AssertionError("an existing output was overwritten without force")
    if digest is not None:
        assert tree_digest(out.parent) == digest
    # --force replaces a previous output of the format (atomically: nothing left beside
    # it), and refuses a directory holding anything its writer does not produce.
    out = convert(src, dst, fmt, registry=registry, force=True, **convert_kwargs)
    assert registry.validate(out, fmt) == [], "a --force replacement fails validation"
    if spec.directory:
        (dst / "notes-of-mine.txt").write_text("not a model file")
        digest = tree_digest(dst)
        try:
            convert(src, dst, fmt, registry=registry, force=True, **convert_kwargs)
        except ConvcoreError as exc:
            assert "notes-of-mine.txt" in str(exc), exc
        else:
            raise AssertionError("--force replaced a directory holding a file it did not write")
        assert tree_digest(dst) == digest
        (dst / "notes-of-mine.txt").unlink()
    # A failure half-way leaves nothing behind.
    failed = tmp_path / ("failed-" + name)
    model = registry.load(src)
    original_load = registry.load
    registry.load = lambda *a, **k: _failing(model, len(model.tensors) // 2)  # type: ignore[method-assign]
    try:
        convert(src, failed, fmt, registry=registry, **convert_kwargs)
    except ConvcoreError as exc:
        assert "simulated read failure" in str(exc)
    else:
        raise AssertionError("a failing tensor read did not fail the conversion")
    finally:
        registry.load = original_load  # type: ignore[method-assign]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith((".", "failed-"))]
    assert leftovers == [], f"partial output left behind: {leftovers}"
    return out
