"""Hooks conv-gguf adds to convcore's, so other packages can extend it.

conv-gguf adds them through ``convcore_add_hookspecs``; implement them with
``@convcore.hookimpl`` in any installed convcore plugin.
"""
from __future__ import annotations

from typing import Callable

from convcore import hookspec


@hookspec
def conv_gguf_register_archs(register: Callable[..., None]) -> None:
    """Register architectures the GGUF writer, reader and validator know.

    Called once per convcore registry, the first time an architecture is looked up.
    Call ``register(conv_gguf.Arch(...))`` for each; ``conv_gguf.BUILTIN_ARCHS[name].alias(
    "my_model_type")`` registers an existing architecture under a new HF ``model_type``.
    A ``model_type`` registered by two plugins, or two entries that both read back a GGUF
    architecture, is an error naming both plugins.

    :param register: callback that takes a :class:`conv_gguf.Arch`.
    :return: nothing; what is passed to ``register`` counts.
    """
