"""Built-in ``convcore_quantize``: runs the registered :class:`convcore.Scheme`.

Plugins provide schemes through ``convcore_register_schemes``; this implementation looks
the scheme up and applies it, so a format plugin quantizes by name without importing the
plugin that implements the math.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..hookspecs import hookimpl
from ..model import ConvcoreError, QuantizedTensor, TensorRef, dtype_name


class SchemeDispatch:
    """Quantizes through the schemes of the registry it belongs to."""

    def __init__(self, registry: Any):
        self.registry = registry

    @hookimpl(trylast=True)
    def convcore_quantize(self, tensor: TensorRef | np.ndarray, scheme: str,
                          options: dict[str, Any]) -> QuantizedTensor | None:
        return quantize_with(self.registry.scheme(scheme), tensor, options)


def make_plugin(registry: Any) -> SchemeDispatch:
    """The plugin object the registry registers for itself."""
    return SchemeDispatch(registry)


def quantize_with(spec: Any, tensor: TensorRef | np.ndarray, options: dict[str, Any]) -> QuantizedTensor:
    """Apply scheme ``spec`` to ``tensor``; errors name the tensor."""
    scheme = spec.name
    name = tensor.name if isinstance(tensor, TensorRef) else options.get("name", "<array>")
    array = tensor.load() if isinstance(tensor, TensorRef) else np.asarray(tensor)
    if dtype_name(array.dtype) not in ("f32", "f16", "bf16"):
        raise ConvcoreError(f"tensor {name!r}: cannot quantize {dtype_name(array.dtype)} "
                            f"with {scheme} (expects f32, f16 or bf16)")
    if array.ndim == 0 or array.shape[-1] % spec.block_size:
        raise ConvcoreError(f"tensor {name!r}: row length {array.shape[-1] if array.ndim else 0} "
                            f"is not a multiple of {scheme}'s block size {spec.block_size}")
    try:
        data = spec.quantize(array, {**options, "name": name})
    except ValueError as exc:
        raise ConvcoreError(f"tensor {name!r}: {scheme}: {exc}") from None
    check_layout(spec, tuple(array.shape), dtype_name(array.dtype), data)
    return QuantizedTensor(name=name, scheme=scheme, shape=tuple(array.shape), data=data,
                           dequantizer=lambda qt: spec.dequantize(qt.data, qt.shape))


def check_layout(spec: Any, shape: tuple[int, ...], dtype: str, data: dict[str, np.ndarray]) -> None:
    """Raise unless ``data`` is exactly what ``spec.layout(shape, dtype)`` declares: the same
    array names, dtypes and shapes. A scheme that breaks its own layout would write
    files no reader can decode, so this is checked on every tensor (it costs nothing).
    A scheme of contract 1 declares no layout: nothing to check."""
    if spec.layout is None:
        return
    expected = spec.layout(shape, dtype)
    got = {k: (dtype_name(v.dtype), tuple(v.shape)) for k, v in data.items()}
    want = {k: (d, tuple(s)) for k, (d, s) in expected.items()}
    if got != want:
        raise ConvcoreError(f"scheme {spec.name} (plugin {spec.plugin or '?'}) returned "
                            f"{_fmt(got)} for {dtype}{list(shape)}; its layout declares {_fmt(want)}")


def _fmt(table: dict[str, tuple[str, tuple[int, ...]]]) -> str:
    return ", ".join(f"{k}: {d}{list(s)}" for k, (d, s) in sorted(table.items()))
