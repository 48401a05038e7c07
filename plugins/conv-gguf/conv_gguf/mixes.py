"""Per-tensor GGUF types, chosen as llama-quantize chooses them.

A ``--quant`` name is a llama.cpp file type ("q4_k_m"); its default tensor type is
bumped for sensitive tensors (output, attn_v, ffn_down, ...) per llama.cpp's
``llama_tensor_get_type``, and a row length that does not divide into the type's block
falls back to a type that fits, each fallback reported.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import gguf

T = gguf.GGMLQuantizationType
F = gguf.LlamaFileType

# --quant name -> (llama file type, default tensor type)
FILE_TYPES: dict[str, tuple[F, T]] = {
    "f32": (F.ALL_F32, T.F32), "f16": (F.MOSTLY_F16, T.F16), "bf16": (F.MOSTLY_BF16, T.BF16),
    "q8_0": (F.MOSTLY_Q8_0, T.Q8_0), "q4_0": (F.MOSTLY_Q4_0, T.Q4_0),
    "q4_1": (F.MOSTLY_Q4_1, T.Q4_1), "q5_0": (F.MOSTLY_Q5_0, T.Q5_0),
    "q5_1": (F.MOSTLY_Q5_1, T.Q5_1), "q2_k": (F.MOSTLY_Q2_K, T.Q2_K),
    "q2_k_s": (F.MOSTLY_Q2_K_S, T.Q2_K),
    "q3_k_s": (F.MOSTLY_Q3_K_S, T.Q3_K), "q3_k_m": (F.MOSTLY_Q3_K_M, T.Q3_K),
    "q3_k_l": (F.MOSTLY_Q3_K_L, T.Q3_K), "q4_k_s": (F.MOSTLY_Q4_K_S, T.Q4_K),
    "q4_k_m": (F.MOSTLY_Q4_K_M, T.Q4_K), "q5_k_s": (F.MOSTLY_Q5_K_S, T.Q5_K),
    "q5_k_m": (F.MOSTLY_Q5_K_M, T.Q5_K), "q6_k": (F.MOSTLY_Q6_K, T.Q6_K),
    # the IQ file types (llama_ftype_get_default_type: iq2_s is mostly IQ2_XS, iq2_m IQ2_S,
    # iq3_xs and iq3_m IQ3_S)
    "iq1_s": (F.MOSTLY_IQ1_S, T.IQ1_S), "iq1_m": (F.MOSTLY_IQ1_M, T.IQ1_M),
    "iq2_xxs": (F.MOSTLY_IQ2_XXS, T.IQ2_XXS), "iq2_xs": (F.MOSTLY_IQ2_XS, T.IQ2_XS),
    "iq2_s": (F.MOSTLY_IQ2_S, T.IQ2_XS), "iq2_m": (F.MOSTLY_IQ2_M, T.IQ2_S),
    "iq3_xxs": (F.MOSTLY_IQ3_XXS, T.IQ3_XXS), "iq3_xs": (F.MOSTLY_IQ3_XS, T.IQ3_S),
    "iq3_s": (F.MOSTLY_IQ3_S, T.IQ3_S), "iq3_m": (F.MOSTLY_IQ3_M, T.IQ3_S),
    "iq4_nl": (F.MOSTLY_IQ4_NL, T.IQ4_NL), "iq4_xs": (F.MOSTLY_IQ4_XS, T.IQ4_XS),
}
SCHEMES = tuple(FILE_TYPES)
FLOATS = (T.F32, T.F16, T.BF16)
# the convcore scheme that produces each block type
SCHEME_OF = {T.Q8_0: "q8_0", T.Q4_0: "q4_0", T.Q4_1: "q4_1", T.Q5_0: "q5_0", T.Q5_1: "q5_1",
             T.Q2_K: "q2_k", T.Q3_K: "q3_k", T.Q4_K: "q4_k", T.Q5_K: "q5_k", T.Q6_K: "q6_k",
             **{t: t.name.lower() for t in (T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S,
                                            T.IQ3_XXS, T.IQ3_S, T.IQ4_NL, T.IQ4_XS)}}
# llama.cpp's fallback when a row does not divide into the block (then F16 if still not)
FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
            **{t: T.IQ4_NL for t in (T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS,
                                     T.IQ3_S, T.IQ4_XS)}}
# tensor types llama-quantize makes only with an importance matrix (tensor_requires_imatrix:
# never for token_embd and output)
NEEDS_IMATRIX = (T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S)

# ffn_down type by file type, as a function of (layer, n_layers, use_more_bits)
FFN_DOWN = {
    "q2_k": lambda i, n, more: T.Q3_K,
    "q2_k_s": lambda i, n, more: T.Q4_K if i < n // 8 else None,
    "q3_k_m": lambda i, n, more: T.Q5_K if i < n // 16 else T.Q4_K,
    "q3_k_l": lambda i, n, more: T.Q5_K,
    "q4_k_m": lambda i, n, more: T.Q6_K if more else None,
    "q5_k_m": lambda i, n, more: T.Q6_K if more else None,
    "q4_k_s": lambda i, n, more: T.Q5_K if i < n // 8 else None,
}
ATTN_OUTPUT = {"q2_k": T.Q3_K, "q3_k_m": T.Q4_K, "q3_k_l": T.Q5_K}


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get a bigger type: first and last eighth, and
    every third layer between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def quantizable(name: str, ndim: int) -> bool:
    """llama-quantize only touches 2-D+ weights that are not norms."""
    return ndim >= 2 and name.endswith("weight") and "_norm.weight" not in name


@dataclass
class MixState:
    """Counters llama.cpp keeps while walking the tensors in file order."""

    n_attention_wv: int
    n_ffn_down: int
    has_output: bool
    n_gqa: int
    n_expert: int = 0
    n_layer: int = 0
    has_imatrix: bool = False
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0


def new_state(names: list[str], n_gqa: int, n_expert: int = 0, n_layer: int = 0,
              has_imatrix: bool = False) -> MixState:
    """Counters for a file holding tensors ``names`` (in write order); ``n_expert`` and
    ``n_layer`` for mixtures of experts; ``has_imatrix`` when an importance matrix is given
    (some mixes then choose other types)."""
    return MixState(
        n_attention_wv=sum(1 for n in names if re.search(r"attn_(v|qkv)\.weight", n)),
        # llama.cpp counts layers (n_layer), not tensors: biases (BERT's) do not count
        n_ffn_down=sum(1 for n in names if "ffn_down" in n and n.endswith(".weight")),
        has_output="output.weight" in names, n_gqa=n_gqa, n_expert=n_expert, n_layer=n_layer,
        has_imatrix=has_imatrix)


# file types whose attn_output llama.cpp bumps to Q5_K in 8-expert models (Mixtral)
_ATTN_OUTPUT_8X = ("q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m", "iq3_xs", "iq3_xxs", "iq4_nl",
                   "iq3_s", "iq3_m", "iq4_xs")
# the very low-bit IQ mixes, which llama.cpp treats in a branch of their own
_IQ_LOW = ("iq2_xxs", "iq2_xs", "iq1_s", "iq2_s", "iq2_m", "iq1_m")


def _category(name: str) -> str:
    """llama.cpp's tensor category (tensor_get_category), checked in its order."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for part, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_v"),
                      ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
                      ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                      ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if part in name:
            return cat
    return "other"


def _layer(state: MixState, counter: int, n: int, name: str) -> tuple[int, int]:
    """(layer, layers) of an ffn tensor: a counter, or in mixtures of experts the layer in
    the name (experts and shared experts are several tensors a layer)."""
    if state.n_expert > 1:
        return int(name.split(".")[1]), state.n_layer
    return counter, n


def _mix_type(state: MixState, ftype: str, name: str, ncols: int, default: T) -> T:
    """llama_tensor_get_type_impl for the file types convcore writes."""
    new = default
    cat = _category(name)
    n_gqa, n_expert = state.n_gqa, state.n_expert
    iq2s = ftype in ("iq2_s", "iq2_m")
    if cat == "output" or (not state.has_output and cat == "token_embd"):
        if ncols % gguf.GGML_QUANT_SIZES[default][0] != 0:
            return T.Q8_0
        if ftype in _IQ_LOW or ftype == "iq3_xxs":
            return T.Q5_K
        return T.Q6_K if default != T.Q8_0 else default
    if cat == "token_embd":
        if ftype in ("iq2_xxs", "iq2_xs", "iq1_s", "iq1_m"):
            return T.Q2_K
        if iq2s or ftype == "iq3_xxs":
            return T.IQ3_S
        return new
    if ftype in _IQ_LOW:
        if cat in ("attn_v", "attn_qkv"):
            new = T.Q4_K if n_gqa >= 4 or n_expert >= 4 else (T.IQ3_S if iq2s else T.Q2_K)
            state.i_attention_wv += 1
        elif n_expert == 8 and cat == "attn_k":
            new = T.Q4_K
        elif cat == "ffn_down":
            if state.i_ffn_down < (state.n_layer or state.n_ffn_down) // 8:
                new = T.IQ3_S if iq2s else T.Q2_K
            state.i_ffn_down += 1
        elif cat == "attn_output":
            if n_expert == 8:
                new = T.Q5_K
            elif ftype in ("iq1_s", "iq1_m"):
                new = T.IQ2_XXS
            elif iq2s:
                new = T.IQ3_S
        return new
    if cat in ("attn_v", "attn_qkv"):
        # llama.cpp treats fused qkv like attn_v (its own qkv rule is never reached)
        i, n = state.i_attention_wv, state.n_attention_wv
        if ftype == "q2_k":
            new = T.Q4_K if n_gqa >= 4 else T.Q3_K
        elif ftype == "q2_k_s" and n_gqa >= 4:
            new = T.Q4_K
        elif ftype == "iq3_xxs":
            new = T.Q4_K if n_gqa >= 4 else (T.IQ3_XXS if state.has_imatrix else T.IQ3_S)
        elif ftype in ("iq3_xs", "iq3_s") and n_gqa >= 4:
            new = T.Q4_K
        elif ftype == "iq3_m":
            new = T.Q4_K
        elif ftype == "q3_k_m":
            new = T.Q5_K if i < 2 else T.Q4_K
        elif ftype == "q3_k_l":
            new = T.Q5_K
        elif ftype in ("iq4_nl", "iq4_xs") and n_gqa >= 4:
            new = T.Q5_K
        elif ftype in ("q4_k_m", "q5_k_m") and use_more_bits(i, n):
            new = T.Q6_K
        elif ftype == "q4_k_s" and i < 4:
            new = T.Q5_K
        if n_expert == 8:   # llama.cpp: "bumping this to Q8_0 trades just ~128MB"
            new = T.Q8_0
        state.i_attention_wv += 1
    elif cat == "attn_k":
        if n_expert == 8:
            new = T.Q8_0
        elif ftype == "iq3_xs":
            new = T.IQ3_XXS
        elif ftype == "iq3_xxs":
            new = T.IQ2_S
    elif cat == "attn_q":
        if ftype == "iq3_xs":
            new = T.IQ3_XXS
        elif ftype == "iq3_xxs":
            new = T.IQ2_S
    elif cat == "ffn_down":
        i, n = _layer(state, state.i_ffn_down, state.n_ffn_down, name)
        more = use_more_bits(i, n)
        if ftype == "iq3_xxs" and not state.has_imatrix:
            new = T.Q4_K if i < n // 8 else T.Q3_K
        elif ftype == "iq3_m" and (i < n // 8 or (n_expert == 8 and more)):
            new = T.Q4_K
        elif ftype in ("iq4_nl", "iq4_xs") and i < n // 8 and not state.has_imatrix:
            new = T.Q5_K
        elif ftype in ("q4_0", "q5_0") and state.has_imatrix and i < n // 8:
            # llama.cpp guards the first ffn_down layers of these two, with an imatrix only
            new = T.Q4_1 if ftype == "q4_0" else T.Q5_1
        else:
            rule = FFN_DOWN.get(ftype)
            if rule is not None:
                new = rule(i, n, more) or new
        state.i_ffn_down += 1
    elif cat == "attn_output":
        if n_expert == 8:
            new = T.Q5_K if ftype in _ATTN_OUTPUT_8X else new
        elif ftype == "iq3_xxs":
            new = T.IQ3_S
        elif ftype == "iq3_m":
            new = T.Q4_K
        else:
            new = ATTN_OUTPUT.get(ftype, new)
    elif cat == "attn_qkv":   # (unreachable, as in llama.cpp: attn_qkv is taken as attn_v above)
        pass
    elif cat in ("ffn_gate", "ffn_up"):
        counter = state.i_ffn_gate if cat == "ffn_gate" else state.i_ffn_up
        i, n = _layer(state, counter, state.n_layer or state.n_ffn_down, name)
        if ftype == "iq3_xs" and n // 8 <= i < 7 * n // 8:
            new = T.IQ3_XXS
        if cat == "ffn_gate":
            state.i_ffn_gate += 1
        else:
            state.i_ffn_up += 1
    return new


# 2-D tensors llama.cpp keeps in F32 whatever the file type: its converter writes them so
# and llama-quantize leaves BERT's position and token-type embeddings alone
ALWAYS_F32 = ("position_embd.weight", "token_types.weight")


def choose_type(state: MixState | None, quant: str | None, name: str, shape: tuple[int, ...],
                float_type: T, notes: list[str]) -> T:
    """The GGUF type of one tensor. ``float_type`` is what unquantized 2-D tensors get;
    1-D tensors, norms and :data:`ALWAYS_F32` are always F32. ``state`` None means
    llama-quantize's --pure (the file type's default type everywhere). Fallbacks are
    appended to ``notes``."""
    if sum(d > 1 for d in shape) < 2 or name.endswith("_norm.weight") or name in ALWAYS_F32:
        # (a [1, n] tensor is 1-D to ggml: Qwen2-MoE's shared-expert gate)
        return T.F32
    if name.endswith("ffn_gate_inp.weight"):
        # the router: llama.cpp's converter writes it F32, llama-quantize never touches it
        return T.F32
    if quant is None or quant in ("f32", "f16", "bf16"):
        return float_type
    if not quantizable(name, len(shape)):
        return float_type
    default = FILE_TYPES[quant][1]
    new = _mix_type(state, quant, name, shape[-1], default) if state else default
    block = gguf.GGML_QUANT_SIZES[new][0]
    if shape[-1] % block != 0:
        fallback = FALLBACK.get(new, T.F16)
        if shape[-1] % gguf.GGML_QUANT_SIZES[fallback][0] != 0:
            fallback = T.F16
        notes.append(f"{name}: row length {shape[-1]} is not a multiple of {block} "
                     f"(required for {new.name.lower()}); falling back to {fallback.name.lower()}")
        new = fallback
    return new
