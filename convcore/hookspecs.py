"""The hook contract between convcore and its plugins.

Every hook is called with keyword arguments. The argument names are a fixed vocabulary:
``register``, ``path``, ``fmt``, ``options``, ``model``, ``target``, ``tensor``,
``scheme``, ``progress``, ``token_ids``. A plugin implements any subset, with any subset
of a hook's arguments, and marks each function with ``@convcore.hookimpl``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
from pluggy import HookimplMarker, HookspecMarker

from .model import Model, QuantizedTensor, TensorRef

hookspec = HookspecMarker("convcore")
hookimpl = HookimplMarker("convcore")


@hookspec
def convcore_register_formats(register: Callable[..., None]) -> None:
    """Register the file formats this plugin reads or writes.

    Called once when the registry is built. Call ``register(convcore.Format(...))`` for
    each format. Two plugins registering the same format name is an error naming both.

    :param register: callback that takes a :class:`convcore.Format`.
    :return: nothing; what is passed to ``register`` counts.
    """


@hookspec
def convcore_register_schemes(register: Callable[..., None]) -> None:
    """Register the quantization schemes this plugin implements.

    Called once when the registry is built. Call ``register(convcore.Scheme(...))`` for
    each scheme (name, quantize and dequantize functions, block size). Two plugins
    registering the same scheme name is an error naming both.

    :param register: callback that takes a :class:`convcore.Scheme`.
    :return: nothing; what is passed to ``register`` counts.
    """


@hookspec(firstresult=True)
def convcore_load(path: Path, fmt: str, options: dict[str, Any]) -> Model | None:
    """Open ``path`` as format ``fmt`` and describe it as a :class:`convcore.Model`.

    Loaders are tried in turn; return None if ``fmt`` is not yours. Read headers only:
    tensor data must be read lazily through each :class:`convcore.TensorRef`'s loader.
    Raise :class:`convcore.ConvcoreError` naming the file for broken input.
    Stops at first non-None result.

    :param path: file or directory to read.
    :param fmt: format name, already detected when the user gave none.
    :param options: loader options from the caller (may be empty).
    :return: the model, or None if not relevant.
    """


@hookspec
def convcore_map_names(model: Model, target: str) -> dict[str, str] | None:
    """Map the model's HF tensor names to the naming of format ``target``.

    Used by writers that rename tensors and by ``convcore compare`` to pair tensors
    across formats. Results of all implementations are merged (first wins per name).

    :param model: the loaded model (names, config; no data is read).
    :param target: format name whose naming is wanted.
    :return: ``{hf_name: target_name}`` for the names you know, or None if not relevant.
    """


@hookspec(firstresult=True)
def convcore_quantize(
    tensor: TensorRef | np.ndarray, scheme: str, options: dict[str, Any]
) -> QuantizedTensor | None:
    """Quantize one tensor with the scheme named ``scheme``.

    The core implements this for every registered :class:`convcore.Scheme`; implement it
    only to take over a scheme (mark ``tryfirst``), e.g. with a GPU kernel.
    Stops at first non-None result.

    :param tensor: the tensor (a reference, loaded on demand, or an array).
    :param scheme: registered scheme name, e.g. ``"q4_k"`` or ``"int4-g64"``.
    :param options: scheme options (may be empty).
    :return: the packed tensor, or None if not relevant.
    """


@hookspec(firstresult=True)
def convcore_write(
    model: Model, path: Path, fmt: str, options: dict[str, Any], progress: Callable[[str], None]
) -> Path | None:
    """Write ``model`` to ``path`` in format ``fmt``.

    ``path`` is a temporary name the core renames into place when the write succeeds;
    write only there. Pull tensors one at a time (``ref.load()``), quantizing on the way
    through :func:`convcore.quantize`, so memory stays bounded by a few tensors. Call
    ``progress(name)`` once per source tensor written. ``options`` holds ``quant``,
    ``dtype``, ``metadata``, ``jobs`` and format-specific keys.
    Stops at first non-None result.

    :param model: the model to write.
    :param path: where to write (a file or a directory, per the format).
    :param fmt: format name; return None if not yours.
    :param options: write options.
    :param progress: callback advanced once per tensor.
    :return: the path written, or None if not relevant.
    """


@hookspec
def convcore_validate(path: Path, fmt: str) -> list[str] | None:
    """Check that ``path`` is a well-formed ``fmt`` file or directory.

    All implementations are called and their problems collected.

    :param path: file or directory to check.
    :param fmt: its format; return None if not yours.
    :return: a list of one-line problems (empty when valid), or None if not relevant.
    """


@hookspec(firstresult=True)
def convcore_infer(path: Path, fmt: str, token_ids: list[int]) -> np.ndarray | None:
    """Run the model at ``path`` in the format's native runtime on ``token_ids``.

    Stops at first non-None result.

    :param path: model file or directory.
    :param fmt: its format; return None if not yours.
    :param token_ids: the prompt as token ids (one sequence).
    :return: float32 logits of shape ``(len(token_ids), vocab)``, or None if not relevant.
    """
