"""Computing an importance matrix as ``llama-imatrix`` does, in transformers.

For every matrix of the layers (GGUF ``blk.*``; ``output.weight`` only when asked, and never
when it is the tied embedding, as llama.cpp then multiplies by ``token_embd``) the sum over
tokens of each input column's squared activation, and the tokens summed. A stack of
experts gets one row per expert, each summing only the tokens routed to it. The text is
tokenized with the model's special tokens, cut into ``ctx``-token chunks whose first token
is set to BOS (when the model adds one), a partial last chunk dropped; each chunk is one
forward pass of its own.
"""
from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

import convcore
from convcore import ConvcoreError

from . import arch_table, archs
from .imatrix import Imatrix

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class _Sums:
    """Float64 sums per GGUF tensor: ``values`` (n_mat, columns), ``counts`` (n_mat,)."""

    def __init__(self) -> None:
        self.values: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}

    def add(self, name: str, x: Any, n_mat: int = 1, mat: int = 0) -> None:
        rows = x.reshape(-1, x.shape[-1]).double()
        if name not in self.values:
            self.values[name] = np.zeros((n_mat, rows.shape[1]), np.float64)
            self.counts[name] = np.zeros(n_mat, np.float64)
        self.values[name][mat] += rows.pow(2).sum(0).numpy()
        self.counts[name][mat] += rows.shape[0]


def chunks(ids: list[int], ctx: int, bos: int | None, limit: int | None) -> list[list[int]]:
    """llama-imatrix's chunks: whole ``ctx``-token pieces of ``ids``, first token BOS."""
    n = len(ids) // ctx
    if limit is not None and limit > 0:
        n = min(n, limit)
    out = []
    for c in range(n):
        piece = list(ids[c * ctx:(c + 1) * ctx])
        if bos is not None:
            piece[0] = bos
        out.append(piece)
    return out


def _gguf_names(model: convcore.Model) -> tuple[archs.Arch, dict[str, Any], dict[str, str]]:
    spec = arch_table.arch_for(model.arch, model.source)
    config = {**spec.config_defaults, **model.config}
    names = {}
    for name in model.tensors:
        gg = archs.map_name(spec, name)
        if gg is not None:
            names[name] = gg
    return spec, config, names


def _hf_dir(src: Path, from_: str | None, tmp: Path) -> tuple[Path, convcore.Model]:
    """An HF folder transformers can load for ``src`` (other formats converted into ``tmp``
    in float32 first), and the model as the hf reader sees it."""
    model = convcore.load(src, from_)
    if model.format != "hf":
        out = tmp / "hf"
        convcore.convert(src, out, to="hf", from_=from_, quant="f32", progress=False)
        model = convcore.load(out, "hf")
        return out, model
    return src, model


def _tokenize(folder: Path, text: str) -> tuple[list[int], int | None]:
    """The text's ids with the model's special tokens, and BOS when the model adds one."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    ids = list(tok(text, add_special_tokens=True)["input_ids"])
    bos = tok.bos_token_id
    adds_bos = bos is not None and bool(ids) and ids[0] == bos
    return ids, (int(bos) if adds_bos else None)


def compute(src: Path, text_file: Path, ctx: int = 512, n_chunks: int | None = None,
            process_output: bool = False, from_: str | None = None, threads: int | None = None,
            progress: bool = True) -> Imatrix:
    """The importance matrix of ``src`` on the text of ``text_file``."""
    try:
        text = Path(text_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConvcoreError(f"{text_file}: cannot read the text ({getattr(exc, 'strerror', None) or exc})") from None
    if ctx < 2:
        raise ConvcoreError(f"--ctx {ctx}: a chunk needs at least 2 tokens")
    with tempfile.TemporaryDirectory(prefix="convcore-imatrix-") as tmp:
        folder, model = _hf_dir(Path(src), from_, Path(tmp))
        ids, bos = _tokenize(folder, text)
        pieces = chunks(ids, ctx, bos, n_chunks)
        if not pieces:
            raise ConvcoreError(f"{text_file}: {len(ids)} tokens, fewer than one chunk of {ctx} "
                                "(give a longer text or a smaller --ctx)")
        model = convcore.text_model(model, "llama.cpp")
        sums = _run(folder, model, pieces, process_output, threads, progress)
    return Imatrix(sums={k: v.astype(np.float32) for k, v in sums.values.items()},
                   counts={k: v.astype(np.float32) for k, v in sums.counts.items()},
                   datasets=[str(text_file)], chunk_count=len(pieces), chunk_size=ctx)


def _run(folder: Path, model: convcore.Model, pieces: list[list[int]], process_output: bool,
         threads: int | None, progress: bool) -> _Sums:
    from convcore.builtins.hf_runtime import _load

    spec, config, names = _gguf_names(model)
    torch, net = _load(folder, {"threads": threads}, "AutoModelForCausalLM")
    tied = bool(config.get("tie_word_embeddings", False))
    sums = _Sums()
    handles = []
    unmapped = []
    for path, module in net.named_modules():
        hook = _hook_for(path, module, names, spec, sums, tied, process_output, torch)
        if hook is None:
            if isinstance(module, torch.nn.Linear) and _LAYER.search(path):
                unmapped.append(path)
            continue
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    if unmapped:
        print(f"note: {len(unmapped)} linear layers have no GGUF tensor and are not measured "
              f"({', '.join(unmapped[:3])}{', ...' if len(unmapped) > 3 else ''})", file=sys.stderr)
    from tqdm import tqdm

    try:
        with torch.no_grad():
            for piece in tqdm(pieces, desc="imatrix", unit="chunk", disable=not progress,
                              file=sys.stderr):
                net(torch.tensor([piece], dtype=torch.long), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return sums


def _hook_for(path: str, module: Any, names: dict[str, str], spec: archs.Arch, sums: _Sums,
              tied: bool, process_output: bool, torch: Any) -> Callable | None:
    """A forward pre-hook adding ``module``'s input to the sums of its GGUF tensor(s)."""
    layer = _LAYER.search(path)
    experts = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if layer and all(isinstance(p, torch.nn.Parameter) and p.ndim == 3 for p in experts):
        return _experts_hook(int(layer.group(1)), module, sums, torch)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.nn.Parameter) or weight.ndim != 2:
        return None
    gg = names.get(f"{path}.weight")
    if gg is None and layer and path.endswith(".gate") and spec.experts:
        gg = f"blk.{layer.group(1)}.ffn_gate_inp.weight"   # the router, renamed in memory
    if gg is None or not (gg.startswith("blk.") or (process_output and gg == "output.weight" and not tied)):
        return None
    if not isinstance(module, torch.nn.Linear) and not gg.endswith("ffn_gate_inp.weight"):
        return None

    def hook(mod: Any, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        sums.add(gg, x)
    return hook


def _experts_hook(layer: int, module: Any, sums: _Sums, torch: Any) -> Callable:
    """Per-expert sums for transformers' stacked experts (``gate_up_proj`` [E, 2I, H],
    ``down_proj`` [E, H, I]): the tokens routed to each expert, and the input its down
    projection sees, made as the experts' own forward makes it."""
    n_expert = module.gate_up_proj.shape[0]
    gate, up, down = (f"blk.{layer}.ffn_{k}_exps.weight" for k in ("gate", "up", "down"))

    def hook(mod: Any, args: tuple, kwargs: dict) -> None:
        values = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index", "top_k_weights") if k in kwargs]
        hidden, index = values[0], values[1]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        index = index.reshape(hidden.shape[0], -1)
        for e in range(n_expert):
            tokens = (index == e).any(dim=-1).nonzero().flatten()
            # an expert no token reached keeps a count of 0 (llama.cpp: all ones when quantizing)
            x = hidden[tokens]
            for name in (gate, up):
                sums.add(name, x, n_expert, e)
            if len(tokens):
                g, u = torch.nn.functional.linear(x, mod.gate_up_proj[e]).chunk(2, dim=-1)
                sums.add(down, mod.act_fn(g) * u, n_expert, e)
            else:
                sums.add(down, x.new_zeros((0, mod.down_proj.shape[-1])), n_expert, e)
    return hook
