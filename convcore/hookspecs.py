"""The hook contract between convcore and its plugins.

Every hook is called with keyword arguments. The argument names are a fixed vocabulary:
``pluginmanager``, ``register``, ``path``, ``fmt``, ``options``, ``model``, ``target``, ``tensor``,
``scheme``, ``progress``, ``token_ids``. A plugin implements any subset, with any subset
of a hook's arguments, and marks each function with ``@convcore.hookimpl``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
from pluggy import HookimplMarker, HookspecMarker

from .model import Model, QuantizedTensor, TensorRef
from .runtime import Session

hookspec = HookspecMarker("convcore")
hookimpl = HookimplMarker("convcore")


@hookspec(historic=True)
def convcore_add_hookspecs(pluginmanager: Any) -> None:
    """Add hook specifications of your own, so other packages can extend your plugin.

    Called for every plugin as it is registered (a historic hook: plugins registered
    later are called too), before any other hook and before the registry checks that
    every implementation has a spec. Call ``pluginmanager.add_hookspecs(module)`` with a
    module of ``@convcore.hookspec`` functions; other plugins then implement them with
    ``@convcore.hookimpl`` and you call them through ``convcore.get_registry().hook``.
    A format plugin's table of architectures is the typical use.

    :param pluginmanager: the registry's ``pluggy.PluginManager``.
    :return: nothing.
    """


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

    Loaders give tensors their HF names back, so models pair by HF name; this hook
    says what each is called in ``target``'s own naming, which ``convcore compare
    --tensors`` shows beside it. A format's writer may use its own tables directly.
    Results of all implementations are merged (first wins per name).

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
def convcore_open_session(path: Path, fmt: str, options: dict[str, Any]) -> Session | None:
    """Load the model at ``path`` once in the format's native runtime.

    The session computes logits for a sequence, extends it token by token with the
    runtime's KV cache and is closed by its caller (it is a context manager). ``infer``,
    ``compare`` and generation use it; ``convcore_infer`` falls back to it.
    Stops at first non-None result.

    :param path: model file or directory.
    :param fmt: its format; return None if not yours.
    :param options: runtime hints, may be empty: ``n_ctx`` (how many tokens the session
        must hold), ``threads``, ``verbose`` (let the runtime's own log through; quiet
        otherwise), ``lora`` (``[(adapter path, scale), ...]``: adapters in the runtime's
        own format to apply; a session that applies them sets ``lora_applied = True``, else
        the caller refuses it). Ignore keys you don't use.
    :return: a :class:`convcore.Session`, or None if not relevant.
    """


@hookspec(firstresult=True)
def convcore_infer(path: Path, fmt: str, token_ids: list[int]) -> np.ndarray | None:
    """Run the model at ``path`` in the format's native runtime on ``token_ids``, once.

    The core implements it for every format that opens a session
    (``convcore_open_session``); implement it only for a runtime without sessions.
    Stops at first non-None result.

    :param path: model file or directory.
    :param fmt: its format; return None if not yours.
    :param token_ids: the prompt as token ids (one sequence).
    :return: float32 logits of shape ``(len(token_ids), vocab)``, or None if not relevant.
    """


@hookspec
def convcore_register_commands(cli: Any) -> None:
    """Add commands to the ``convcore`` command line.

    ``cli`` is the ``click.Group`` every ``convcore`` command belongs to: call
    ``cli.add_command(command)`` with your ``click.Command`` (or decorate with
    ``@cli.command()``). Called once per process, before the command line is parsed.
    A name the core or another plugin already uses is an error naming both.

    :param cli: the ``convcore`` click group.
    :return: nothing.
    """

