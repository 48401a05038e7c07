"""Hooks conv-mlx adds to convcore's, so other packages can extend it.

conv-mlx adds them through ``convcore_add_hookspecs``; implement them with
``@convcore.hookimpl`` in any installed convcore plugin.
"""
from __future__ import annotations

from typing import Callable

from convcore import hookspec


@hookspec
def conv_mlx_register_archs(register: Callable[..., None]) -> None:
    """Register architectures the MLX writer knows.

    Called once per convcore registry, the first time an architecture is looked up.
    Call ``register(conv_mlx.ArchRules(...))`` for each (mlx-lm must serve the
    ``model_type`` too, or the output will not load); ``conv_mlx.BUILTIN_ARCHS[name].alias(
    "my_model_type")`` reuses an existing entry. A ``model_type`` registered by two
    plugins is an error naming both.

    :param register: callback that takes a :class:`conv_mlx.ArchRules`.
    :return: nothing; what is passed to ``register`` counts.
    """
