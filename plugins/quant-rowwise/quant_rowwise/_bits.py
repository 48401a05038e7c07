"""Reinterpreting a float32 as its uint32 bits and back inside Numba kernels (an LLVM
bitcast, free at run time). Kernels use the bits to find block maxima with integer
reductions, which LLVM vectorises where float max/min without fast-math stay scalar."""
from __future__ import annotations

from numba import types
from numba.extending import intrinsic


@intrinsic
def f32_from_bits(typingctx, bits):
    if bits != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return types.float32(types.uint32), codegen


@intrinsic
def bits_from_f32(typingctx, value):
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))

    return types.uint32(types.float32), codegen
