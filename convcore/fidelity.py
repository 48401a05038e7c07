"""Fidelity of a conversion: the candidate's outputs against the reference's, each model
in its own runtime, on the same token ids.

Text is tokenized with the reference's tokenizer and cut into windows of ``ctx`` tokens
(each starting with BOS when the tokenizer uses one, as llama.cpp's perplexity does);
each window runs once in each session. Reported: perplexity of each model (the targets
are every token of a window after its first), ΔPPL, KL(ref‖cand) per position (mean and
99th percentile), top-1 agreement and the largest logit difference.

Tolerances for ``run --check`` live beside each scheme's registration
(:attr:`convcore.Scheme.tolerance`); plain dtypes have theirs in :data:`DTYPE_TOLERANCE`.
"""
from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .model import ConvcoreError, Model

DEFAULT_TEXT = Path(__file__).parent / "data" / "eval.txt"
DEFAULT_CTX = 512
#: exit status of ``convcore run --check`` when the output is beyond its tolerance
CHECK_FAILED_EXIT = 3
#: tolerances of the plain float types: mean KL(source‖output) at most ``kl``, top-1
#: agreement at least ``top1``, on the bundled text
DTYPE_TOLERANCE: dict[str, dict[str, float]] = {
    "f32": {"kl": 1e-6, "top1": 0.999},
    "f16": {"kl": 1e-3, "top1": 0.98},
    "bf16": {"kl": 5e-3, "top1": 0.96},
}


@dataclass
class Report:
    """What ``compare`` measures. ``kl_*`` in nats per position."""

    tokens: int
    windows: int
    ctx: int
    ppl_ref: float
    ppl_cand: float
    delta_ppl: float
    delta_ppl_pct: float
    kl_mean: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    max_abs_diff: float
    rel_error: float
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(out.pop("extra"))
        return out


def read_text(path: Path | None) -> str:
    path = Path(path) if path else DEFAULT_TEXT
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConvcoreError(f"{path}: cannot read the text ({type(exc).__name__})") from None
    if path == DEFAULT_TEXT and text.startswith("#"):
        text = text.split("\n", 2)[-1]  # the licence line is not part of the text
    if not text.strip():
        raise ConvcoreError(f"{path}: the text is empty")
    return text


def tokenizer_for(model: Model) -> Any:
    """A transformers tokenizer from the tokenizer files the model carries."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConvcoreError("tokenizing text needs transformers; pass token ids instead") from None
    if not model.tokenizer:
        raise ConvcoreError(f"{model.source}: no tokenizer files to tokenize the text with; "
                            "pass token ids instead")
    with tempfile.TemporaryDirectory(prefix="convcore-tok-") as tmp:
        for name, data in model.tokenizer.items():
            (Path(tmp) / Path(name).name).write_bytes(data)
        (Path(tmp) / "config.json").write_text(json.dumps(model.config))
        try:
            return AutoTokenizer.from_pretrained(tmp)
        except (OSError, ValueError) as exc:
            raise ConvcoreError(f"{model.source}: its tokenizer does not load: "
                                f"{(str(exc).splitlines() or [''])[0]}") from None


def text_windows(tokenizer: Any, text: str, ctx: int, limit: int | None = None) -> list[list[int]]:
    """Token windows of at most ``ctx`` ids covering ``text`` (at most ``limit`` ids in
    all); each starts with BOS when the tokenizer puts one first."""
    if ctx < 2:
        raise ConvcoreError("--ctx must be at least 2")
    ids = [int(t) for t in tokenizer(text, add_special_tokens=False).input_ids]
    bos = tokenizer.bos_token_id
    uses_bos = bos is not None and tokenizer("a").input_ids[:1] == [bos]
    body = ctx - 1 if uses_bos else ctx
    if limit:
        ids = ids[:limit]
    windows = []
    for start in range(0, len(ids), body):
        chunk = ids[start:start + body]
        if len(chunk) < 2 and windows:
            break
        windows.append(([int(bos)] if uses_bos else []) + chunk)
    if not windows or len(windows[0]) < 2:
        raise ConvcoreError("the text is shorter than two tokens")
    return windows


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    x -= np.log(np.exp(x).sum(-1, keepdims=True))
    return x


def nll(logprobs: np.ndarray, window: Sequence[int]) -> np.ndarray:
    """Negative log-likelihood of each token after the first, given the ones before."""
    targets = np.asarray(window[1:], dtype=np.int64)
    return -logprobs[np.arange(len(targets)), targets]


class Accumulator:
    """Per-window statistics, merged into a :class:`Report`."""

    def __init__(self) -> None:
        self.nll_ref: list[np.ndarray] = []
        self.nll_cand: list[np.ndarray] = []
        self.kl: list[np.ndarray] = []
        self.agree = 0
        self.positions = 0
        self.max_abs = 0.0
        self.sq_diff = 0.0
        self.sq_ref = 0.0
        self.windows = 0

    def add(self, window: Sequence[int], ref_logits: np.ndarray, cand_logits: np.ndarray) -> None:
        if ref_logits.shape != cand_logits.shape:
            raise ConvcoreError(f"logit shapes differ: {list(ref_logits.shape)} vs {list(cand_logits.shape)}")
        la, lb = log_softmax(ref_logits), log_softmax(cand_logits)
        self.nll_ref.append(nll(la, window))
        self.nll_cand.append(nll(lb, window))
        self.kl.append(np.maximum((np.exp(la) * (la - lb)).sum(-1), 0.0))
        self.agree += int((ref_logits.argmax(-1) == cand_logits.argmax(-1)).sum())
        self.positions += ref_logits.shape[0]
        diff = ref_logits.astype(np.float64) - cand_logits.astype(np.float64)
        self.max_abs = max(self.max_abs, float(np.abs(diff).max()))
        self.sq_diff += float((diff * diff).sum())
        self.sq_ref += float((ref_logits.astype(np.float64) ** 2).sum())
        self.windows += 1

    def report(self, ctx: int) -> Report:
        nr, nc, kl = np.concatenate(self.nll_ref), np.concatenate(self.nll_cand), np.concatenate(self.kl)
        ppl_ref = float(math.exp(nr.mean())) if nr.size else float("nan")
        ppl_cand = float(math.exp(nc.mean())) if nc.size else float("nan")
        return Report(
            tokens=self.positions, windows=self.windows, ctx=ctx, ppl_ref=ppl_ref, ppl_cand=ppl_cand,
            delta_ppl=ppl_cand - ppl_ref, delta_ppl_pct=100.0 * (ppl_cand - ppl_ref) / ppl_ref,
            kl_mean=float(kl.mean()), kl_p99=float(np.percentile(kl, 99)), kl_max=float(kl.max()),
            top1_agreement=self.agree / max(self.positions, 1), max_abs_diff=self.max_abs,
            rel_error=math.sqrt(self.sq_diff / max(self.sq_ref, 1e-300)))


def perplexity(session: Any, windows: Sequence[Sequence[int]]) -> float:
    """exp(mean NLL) of ``session`` over the windows (targets: every token after the first)."""
    losses = [nll(log_softmax(session.logits(list(w))), w) for w in windows]
    return float(math.exp(np.concatenate(losses).mean()))


class Reference:
    """The reference's log-probabilities per window, computed once and kept on disk, so a
    sweep compares many candidates against one run of the reference."""

    def __init__(self, session: Any, windows: Sequence[Sequence[int]], directory: Path):
        self.windows = [list(w) for w in windows]
        self.files = []
        directory.mkdir(parents=True, exist_ok=True)
        for i, w in enumerate(self.windows):
            file = directory / f"ref-{i:05d}.npy"
            np.save(file, np.asarray(session.logits(w), dtype=np.float32))
            self.files.append(file)

    def logits(self) -> Iterator[tuple[list[int], np.ndarray]]:
        for w, file in zip(self.windows, self.files):
            yield w, np.load(file, mmap_mode="r")

    def compare(self, session: Any, ctx: int) -> Report:
        acc = Accumulator()
        for window, ref in self.logits():
            acc.add(window, np.asarray(ref), session.logits(window))
        return acc.report(ctx)


def compare_sessions(ref: Any, cand: Any, windows: Sequence[Sequence[int]], ctx: int) -> Report:
    acc = Accumulator()
    for w in windows:
        w = list(w)
        acc.add(w, ref.logits(w), cand.logits(w))
    return acc.report(ctx)


def compare_paths(registry: Any, ref: Path, cand: Path, ref_fmt: str | None, cand_fmt: str | None,
                  *, text: Path | None = None, ctx: int | None = None, limit: int | None = None,
                  tokens: list[int] | None = None, ref_lora: list | None = None,
                  cand_lora: list | None = None) -> Report:
    """The models at ``ref`` and ``cand``, each in its own runtime (with the LoRA adapters
    ``[(path, scale)]`` of ``ref_lora`` / ``cand_lora`` applied there), on the same windows of
    token ids: ``tokens`` cut into windows, or the text (default: the bundled one)
    tokenized by the reference's tokenizer."""
    ref_model = registry.load(ref, ref_fmt)
    context = int(ref_model.config.get("max_position_embeddings") or DEFAULT_CTX)
    ctx = ctx or min(DEFAULT_CTX, context)
    if tokens is not None:
        windows = [tokens[i:i + ctx] for i in range(0, len(tokens), ctx)]
    else:
        windows = text_windows(tokenizer_for(ref_model), read_text(text), ctx, limit)
    longest = max(len(w) for w in windows)
    with registry.open_session(ref, ref_fmt, {"n_ctx": longest, "lora": ref_lora or []}) as a, \
            registry.open_session(cand, cand_fmt, {"n_ctx": longest, "lora": cand_lora or []}) as b:
        return compare_sessions(a, b, windows, ctx)


def check_output(registry: Any, src: Path, out: Path, src_fmt: str | None, out_fmt: str | None,
                 quant: str | None, dtype: str | None, *, kl: float | None = None,
                 top1: float | None = None, tokens: int = 1024) -> tuple[Report, dict[str, float], list[str]]:
    """``run --check``: compare ``out`` with its source ``src`` on ``tokens`` tokens of the
    bundled text, against the type's tolerance (``kl`` / ``top1`` override it). Returns
    the report, the tolerance used and the limits the output is beyond (empty = passed)."""
    if not quant and not dtype:
        dtype = stored_dtype(registry, out, out_fmt)
    tolerance = dict(tolerance_for(registry, quant, dtype) or {})
    if kl is not None:
        tolerance["kl"] = kl
    if top1 is not None:
        tolerance["top1"] = top1
    if not tolerance:
        raise ConvcoreError(f"--check: no tolerance known for {quant or dtype or 'this output'}; "
                            "give --check-kl and/or --check-top1")
    report = compare_paths(registry, src, out, src_fmt, out_fmt, limit=tokens)
    return report, tolerance, beyond(report, tolerance)


def stored_dtype(registry: Any, path: Path, fmt: str | None) -> str | None:
    """The float type an output without ``--quant``/``--dtype`` keeps its weights in (the
    least precise of its matrices' types), so ``--check`` knows which tolerance applies."""
    order = ("f32", "f16", "bf16")
    found = {t.dtype for t in registry.load(path, fmt).tensors.values() if len(t.shape) >= 2}
    found &= set(order)
    return max(found, key=order.index) if found else None


def tolerance_for(registry: Any, quant: str | None, dtype: str | None) -> dict[str, float] | None:
    """The tolerance ``run --check`` holds an output to: the scheme's, else the dtype's."""
    if quant and quant not in registry.schemes:
        # a format's mix of schemes (gguf's q4_k_m is q4_k with some q6_k): the base scheme's
        base = [name for name in registry.schemes if quant.startswith(name + "_")]
        if base:
            quant = max(base, key=len)
    if quant and quant in registry.schemes:
        return getattr(registry.schemes[quant], "tolerance", None)
    name = quant or dtype
    if name in DTYPE_TOLERANCE:
        return DTYPE_TOLERANCE[name]
    return None


def beyond(report: Report, tolerance: dict[str, float]) -> list[str]:
    """Which limits ``report`` breaks (empty when within tolerance)."""
    out = []
    if "kl" in tolerance and report.kl_mean > tolerance["kl"]:
        out.append(f"mean KL {report.kl_mean:.3g} > {tolerance['kl']:g}")
    if "top1" in tolerance and report.top1_agreement < tolerance["top1"]:
        out.append(f"top-1 agreement {report.top1_agreement:.3f} < {tolerance['top1']:g}")
    return out


def text_sentences(tokenizer: Any, text: str, count: int = 16, max_tokens: int = 128) -> list[list[int]]:
    """Token ids (with the tokenizer's own special tokens, as an encoder is fed) of the
    first ``count`` sentences or paragraphs of ``text``."""
    import re
    pieces = [p.strip() for p in re.split(r"(?<=[.!?])\s+|\n\s*\n", text) if len(p.strip()) > 3]
    if not pieces:
        raise ConvcoreError("the text has no sentences")
    return [[int(t) for t in tokenizer(p, truncation=True, max_length=max_tokens).input_ids]
            for p in pieces[:count]]


def compare_encoders(ref: Any, cand: Any, sentences: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Embeddings of each sentence in both sessions: cosine similarity (mean, minimum) and,
    where both runtimes give them, the largest difference of the last hidden states."""
    cosines, max_abs = [], None
    for ids in sentences:
        a, b = np.asarray(ref.embed(list(ids)), np.float64), np.asarray(cand.embed(list(ids)), np.float64)
        if a.shape != b.shape:
            raise ConvcoreError(f"embedding sizes differ: {a.shape[0]} vs {b.shape[0]}")
        cosines.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300)))
        try:
            ha, hb = ref.hidden_states(list(ids)), cand.hidden_states(list(ids))
        except ConvcoreError:
            continue
        diff = float(np.abs(np.asarray(ha, np.float64) - np.asarray(hb, np.float64)).max())
        max_abs = diff if max_abs is None else max(max_abs, diff)
    return {"kind": "encoder", "sentences": len(sentences), "cosine_mean": float(np.mean(cosines)),
            "cosine_min": float(np.min(cosines)), "hidden_max_abs_diff": max_abs}
