"""quant-rowwise: the quantization math of convcore, as Numba kernels.

Registers the schemes (GGUF blocks q8_0 q4_0 q4_1 q5_0 q5_1, k-quants q2_k..q6_k, MLX
affine int{2,3,4,5,6,8}-g{32,64,128}, per-row int{1,2,4,8}-row, int8-row-sym,
int8-tensor) and the ``npz`` format (APL layout). Format plugins use the schemes by name
through ``convcore.quantize``; none imports this package.
"""
from __future__ import annotations

from typing import Callable

import convcore

from . import affine, legacy, rows
from .kquants import SCHEMES as KQUANT_SCHEMES
from .npz import convcore_load, convcore_validate, convcore_write, register_npz  # noqa: F401

__version__ = "0.1.0"
ALL_SCHEMES = [*legacy.SCHEMES, *KQUANT_SCHEMES, *affine.SCHEMES, *rows.SCHEMES]


@convcore.hookimpl
def convcore_register_schemes(register: Callable[..., None]) -> None:
    for scheme in ALL_SCHEMES:
        register(scheme)


@convcore.hookimpl
def convcore_register_formats(register: Callable[..., None]) -> None:
    register_npz(register)
