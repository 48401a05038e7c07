"""``convcore sweep``: convert one source to many quantization types and measure each.

For every type: the size on disk, perplexity and ΔPPL, KL(source‖output) against the
source (whose logits are computed once, :class:`convcore.fidelity.Reference`) and the
generation speed in the target format's own runtime. The results go to ``sweep.json``,
``sweep.md`` (a Markdown table) and a plot of size against mean KL (``sweep.png``,
``sweep.svg``; needs matplotlib, the ``sweep`` extra) with the Pareto front marked, and
two recommendations: the smallest type within a KL budget and the best (lowest KL) type
within a size budget.

A job that fails (the format cannot store the type, a writer or runtime error) is
recorded with its one-line error; the others still run.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

import convcore
from convcore import fidelity
from convcore.destination import check_location, size_on_disk
from convcore.model import ConvcoreError, one_line
from convcore.options import parse_size
from convcore.pipeline import convert
from convcore.registry import FLOAT_SCHEMES, Registry, get_registry

DEFAULT_MAX_KL = 0.05
DEFAULT_GEN_TOKENS = 32
PROMPT_TOKENS = 16
PLOT_HINT = "the plot needs matplotlib: pip install 'convcore-sweep[plot]'"
#: what a sweep writes into its directory (``--force`` replaces nothing else)
SWEEP_FILES = ("sweep.json", "sweep.md", "sweep.png", "sweep.svg")
OUTPUTS_DIR = "outputs"
REFERENCE_DIR = ".reference"
JOB_KEYS = ("quant", "path", "size_bytes", "ppl", "delta_ppl", "delta_ppl_pct", "kl_mean",
            "kl_p99", "top1_agreement", "tokens_per_s", "seconds_to_convert", "imatrix", "error")


def all_quants(fmt: str, registry: Registry | None = None) -> list[str]:
    """Every scheme format ``fmt`` lists, without the plain float types."""
    f = (registry or get_registry()).format(fmt)
    return [s for s in f.schemes if s not in FLOAT_SCHEMES]


def parse_quants(text: str | None, fmt: str, use_all: bool,
                 registry: Registry | None = None) -> list[str]:
    """The types to sweep: ``--all`` (the format's schemes, floats excluded) plus the
    comma list ``--quant``, duplicates dropped, order kept."""
    given = [q.strip() for q in (text or "").split(",") if q.strip()]
    quants = (all_quants(fmt, registry) if use_all else []) + given
    quants = list(dict.fromkeys(quants))
    if not quants:
        raise ConvcoreError("nothing to sweep: pass --quant a,b,c or --all")
    return quants


def default_out_dir(src: Path, fmt: str) -> Path:
    path = Path(os.path.abspath(src))
    name = (path.stem if path.is_file() else path.name) or "model"
    return Path(f"sweep-{name}-{fmt}")


def output_path(out_dir: Path, quant: str, fmt: Any) -> Path:
    """``DIR/outputs/<type>``, with the format's suffix for file formats."""
    suffix = "" if fmt.directory or not fmt.extensions else fmt.extensions[0]
    return out_dir / OUTPUTS_DIR / f"{quant}{suffix}"


# the output directory -------------------------------------------------------------
def _foreign_outputs(outputs: Path, registry: Registry) -> list[str]:
    """Entries of ``DIR/outputs`` that are not converted models of some format."""
    from convcore.destination import foreign_entries

    extensions = tuple(e for f in registry.formats.values() for e in f.extensions)
    foreign = []
    for entry in sorted(outputs.iterdir(), key=lambda p: p.name):
        if entry.is_symlink():
            foreign.append(entry.name)
        elif entry.is_file():
            if not entry.name.startswith(".") and entry.name.endswith(extensions):
                continue
            foreign.append(entry.name)
        elif entry.is_dir():
            # a directory format's output, or a file format's directory of split parts
            if not any(f.outputs and not foreign_entries(entry, f.outputs)
                       for f in registry.formats.values()):
                foreign.append(entry.name + "/")
        else:
            foreign.append(entry.name)
    return foreign


def check_out_dir(out_dir: Path, src: Path, force: bool, registry: Registry) -> None:
    """Refuse an existing non-empty ``out_dir`` unless ``force``, and then unless it holds
    nothing but what a sweep writes. Changes nothing."""
    check_location(out_dir, src)
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise ConvcoreError(f"{out_dir}: exists and is not a directory; choose another -o")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not force:
        raise ConvcoreError(f"{out_dir}: exists and is not empty; pass --force to replace "
                            "a previous sweep there")
    foreign = []
    for entry in sorted(out_dir.iterdir(), key=lambda p: p.name):
        is_dir = entry.is_dir() and not entry.is_symlink()
        if entry.name in SWEEP_FILES and entry.is_file() and not entry.is_symlink():
            continue
        if entry.name == REFERENCE_DIR and is_dir:
            continue
        if entry.name == OUTPUTS_DIR and is_dir:
            foreign += [f"{OUTPUTS_DIR}/{n}" for n in _foreign_outputs(entry, registry)]
            continue
        foreign.append(entry.name + ("/" if is_dir else ""))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConvcoreError(f"{out_dir}: --force replaces only a previous sweep, and it also "
                            f"holds {shown}; choose another -o")


def prepare_out_dir(out_dir: Path, src: Path, force: bool, registry: Registry) -> None:
    """:func:`check_out_dir`, then an empty ``out_dir`` (a previous sweep removed)."""
    check_out_dir(out_dir, src, force, registry)
    out_dir.mkdir(parents=True, exist_ok=True)
    for entry in out_dir.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


# measuring ------------------------------------------------------------------------
def tokens_per_second(session: Any, prompt: Sequence[int], gen_tokens: int,
                      repeats: int = 3, budget_s: float = 2.0) -> float:
    """Greedy generation speed: one short warm-up, then ``gen_tokens`` after ``prompt``
    (no stop tokens, so exactly that many unless the runtime stops itself), timed up to
    ``repeats`` times while the runs take under ``budget_s`` in all; the fastest run
    counts (the others lost time to something else on the machine)."""
    list(session.generate(list(prompt), min(2, gen_tokens)))
    best = float("nan")
    spent = 0.0
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        n = len(list(session.generate(list(prompt), gen_tokens)))
        seconds = time.perf_counter() - start
        spent += seconds
        if seconds > 0 and not best >= n / seconds:
            best = n / seconds
        if spent >= budget_s:
            break
    return best


def reference_ppl(reference: fidelity.Reference) -> float:
    losses = [fidelity.nll(fidelity.log_softmax(np.asarray(ref)), w) for w, ref in reference.logits()]
    return float(math.exp(np.concatenate(losses).mean()))


def pareto_front(jobs: Sequence[dict[str, Any]]) -> list[str]:
    """Types no other beats in both size and mean KL (smaller or equal in both, smaller
    in one), smallest first."""
    ok = [j for j in jobs if measured(j)]
    front = []
    for j in ok:
        beaten = any(o is not j and o["size_bytes"] <= j["size_bytes"] and o["kl_mean"] <= j["kl_mean"]
                     and (o["size_bytes"] < j["size_bytes"] or o["kl_mean"] < j["kl_mean"])
                     for o in ok)
        if not beaten:
            front.append(j)
    front.sort(key=lambda j: (j["size_bytes"], j["kl_mean"]))
    # equal points (same size and KL) both survive; keep the first only
    out: list[str] = []
    seen: set[tuple[int, float]] = set()
    for j in front:
        key = (j["size_bytes"], j["kl_mean"])
        if key not in seen:
            seen.add(key)
            out.append(j["quant"])
    return out


def measured(job: dict[str, Any]) -> bool:
    return (job.get("error") is None and job.get("size_bytes") is not None
            and job.get("kl_mean") is not None and not math.isnan(job["kl_mean"]))


def by_size(jobs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Largest first, failed jobs (in run order) last: the order of the table."""
    return sorted(jobs, key=lambda j: (j["size_bytes"] is None or j["error"] is not None,
                                       -(j["size_bytes"] or 0) if j["error"] is None else 0))


def fmt_mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def recommend(jobs: Sequence[dict[str, Any]], max_kl: float,
              max_size: int | None) -> dict[str, dict[str, Any]]:
    ok = [j for j in jobs if measured(j)]

    def pick(j: dict[str, Any] | None) -> dict[str, Any]:
        return {"quant": j["quant"], "size_bytes": j["size_bytes"], "kl_mean": j["kl_mean"]} if j else {
            "quant": None, "size_bytes": None, "kl_mean": None}

    within_kl = [j for j in ok if j["kl_mean"] <= max_kl]
    small = min(within_kl, key=lambda j: (j["size_bytes"], j["kl_mean"])) if within_kl else None
    r1 = {"max_kl": max_kl, **pick(small)}
    if small:
        r1["message"] = (f"smallest within mean KL {max_kl:g}: {small['quant']} "
                         f"({fmt_mb(small['size_bytes'])}, mean KL {small['kl_mean']:.4g})")
    elif ok:
        closest = min(ok, key=lambda j: (j["kl_mean"], j["size_bytes"]))
        r1["message"] = (f"smallest within mean KL {max_kl:g}: none; the lowest KL is "
                         f"{closest['quant']} ({closest['kl_mean']:.4g})")
    else:
        r1["message"] = f"smallest within mean KL {max_kl:g}: none (no job succeeded)"

    pool = [j for j in ok if max_size is None or j["size_bytes"] <= max_size]
    best = min(pool, key=lambda j: (j["kl_mean"], j["size_bytes"])) if pool else None
    r2 = {"max_size": max_size, **pick(best)}
    where = f"within {fmt_mb(max_size)}" if max_size is not None else "overall (no --max-size)"
    if best:
        r2["message"] = (f"best quality {where}: {best['quant']} "
                         f"(mean KL {best['kl_mean']:.4g}, {fmt_mb(best['size_bytes'])})")
    elif ok:
        smallest = min(ok, key=lambda j: j["size_bytes"])
        r2["message"] = (f"best quality {where}: none; the smallest is {smallest['quant']} "
                         f"({fmt_mb(smallest['size_bytes'])})")
    else:
        r2["message"] = f"best quality {where}: none (no job succeeded)"
    return {"smallest_within_kl": r1, "best_within_size": r2}


# the sweep ------------------------------------------------------------------------
def sweep(src: str | os.PathLike, to: str, quants: Sequence[str], out_dir: str | os.PathLike | None = None,
          *, text: str | os.PathLike | None = None, ctx: int | None = None, limit: int | None = None,
          gen_tokens: int = DEFAULT_GEN_TOKENS, keep: bool = True, max_kl: float = DEFAULT_MAX_KL,
          max_size: int | str | None = None, from_: str | None = None, force: bool = False,
          progress: bool = False, log: Callable[[str], None] | None = None,
          registry: Registry | None = None, imatrix: str | os.PathLike | None = None) -> dict[str, Any]:
    """Convert ``src`` to format ``to`` with each of ``quants`` and measure every output
    against the source; write ``sweep.json``, ``sweep.md`` and the plot into ``out_dir``
    (default ``./sweep-<src name>-<to>``) and return what ``sweep.json`` holds, plus
    ``"files"``: the paths written (and ``"plot_error"`` when there is no plot).

    The source runs once (its logits on every window are kept on disk while the sweep
    runs); each output is opened once in its runtime for the KL/perplexity windows and
    the speed measurement. ``max_size`` is bytes or a size such as ``"2G"``. With
    ``imatrix`` (an importance matrix file) each type runs twice, without and with it (the
    second job's ``quant`` is ``<type>+imatrix``), so the gain shows side by side.
    """
    registry = registry or get_registry()
    src = convcore.resolve_model(src)   # a hub id: its local snapshot
    if not src.exists():
        raise ConvcoreError(f"{src}: no such file or directory")
    fmt = registry.format(to)
    if not fmt.can_write:
        raise ConvcoreError(f"format {to!r} can be read but not written")
    quants = list(dict.fromkeys(quants))
    if not quants:
        raise ConvcoreError("nothing to sweep: no quantization types given")
    if gen_tokens < 1:
        raise ConvcoreError("--gen-tokens must be at least 1")
    if imatrix is not None:
        if not any(o.name == "imatrix" for o in fmt.options):
            raise ConvcoreError(f"--imatrix: format {to} takes no importance matrix")
        if not Path(imatrix).is_file():
            raise ConvcoreError(f"{imatrix}: no such file")
    max_bytes = parse_size(max_size) if max_size is not None else None
    out = Path(out_dir) if out_dir is not None else default_out_dir(src, to)
    say = log or (lambda line: None)

    check_out_dir(out, src, force, registry)
    # the windows (before touching the output directory: a bad text fails early)
    model = registry.load(src, from_)
    context = int(model.config.get("max_position_embeddings") or fidelity.DEFAULT_CTX)
    ctx = ctx or min(fidelity.DEFAULT_CTX, context)
    windows = fidelity.text_windows(fidelity.tokenizer_for(model), fidelity.read_text(
        Path(text) if text else None), ctx, limit)
    prompt = [t for w in windows for t in w][:PROMPT_TOKENS]
    n_ctx = max(max(len(w) for w in windows), len(prompt) + gen_tokens)
    session_options = {"n_ctx": n_ctx}

    prepare_out_dir(out, src, force, registry)
    result: dict[str, Any] = {
        "source": str(src), "source_format": model.format, "format": to,
        "text": str(text) if text else "bundled eval.txt", "ctx": ctx,
        "tokens": sum(len(w) for w in windows), "windows": len(windows), "params": model.num_params,
        "source_size_bytes": size_on_disk(src), "gen_tokens": gen_tokens,
        "source_ppl": None, "source_tokens_per_s": None, "jobs": [], "pareto": [],
        "recommendations": {},
    }
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(quants) * (2 if imatrix else 1) + 1, desc=f"sweep {to}", unit="job", file=sys.stderr,
                   leave=False, disable=None)
        inner = say

        def say(line: str) -> None:
            tqdm.write(line, file=sys.stderr)
            inner(line)
    ref_dir = out / REFERENCE_DIR
    try:
        if bar is not None:
            bar.set_postfix_str("source", refresh=True)
        with registry.open_session(src, from_, session_options) as session:
            reference = fidelity.Reference(session, windows, ref_dir)
            result["source_tokens_per_s"] = tokens_per_second(session, prompt, gen_tokens)
        result["source_ppl"] = reference_ppl(reference)
        say(f"source: perplexity {result['source_ppl']:.4f}, "
            f"{_num(result['source_tokens_per_s'], '.1f')} tokens/s ({model.format})")
        if bar is not None:
            bar.update(1)
        runs = [(q, m) for q in quants for m in ((None, Path(imatrix)) if imatrix else (None,))]
        for base, matrix in runs:
            quant = base + ("+imatrix" if matrix else "")
            if bar is not None:
                bar.set_postfix_str(quant, refresh=True)
            job = run_job(registry, src, from_, fmt, base, out, reference, ctx, prompt,
                          gen_tokens, session_options, keep, imatrix=matrix)
            result["jobs"].append(job)
            if job["error"]:
                say(f"{quant}: failed: {job['error']}")
            else:
                say(f"{quant}: {fmt_mb(job['size_bytes'])}, mean KL {job['kl_mean']:.4g}, "
                    f"PPL {job['ppl']:.4f}, {_num(job['tokens_per_s'], '.1f')} tokens/s")
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        shutil.rmtree(ref_dir, ignore_errors=True)
        outputs = out / OUTPUTS_DIR
        if outputs.is_dir() and not any(outputs.iterdir()):
            outputs.rmdir()

    result["pareto"] = pareto_front(result["jobs"])
    result["recommendations"] = recommend(result["jobs"], max_kl, max_bytes)
    return write_reports(result, out)


def write_reports(result: dict[str, Any], out: Path) -> dict[str, Any]:
    """``sweep.json``, ``sweep.md`` and, with matplotlib, the plot into ``out``; adds
    ``"files"`` (and ``"plot_error"`` without matplotlib) to ``result``."""
    files = [out / "sweep.json", out / "sweep.md"]
    try:
        files += plot(result, out / "sweep.png", out / "sweep.svg")
    except ImportError:
        result["plot_error"] = PLOT_HINT
    (out / "sweep.md").write_text(markdown(result), encoding="utf-8")
    saved = {k: v for k, v in result.items() if k not in ("files", "plot_error")}
    (out / "sweep.json").write_text(json.dumps(finite(saved), indent=2) + "\n", encoding="utf-8")
    result["files"] = [str(f) for f in files]
    return result


def run_job(registry: Registry, src: Path, from_: str | None, fmt: Any, quant: str, out: Path,
            reference: fidelity.Reference, ctx: int, prompt: list[int], gen_tokens: int,
            session_options: dict[str, Any], keep: bool, imatrix: Path | None = None) -> dict[str, Any]:
    job: dict[str, Any] = dict.fromkeys(JOB_KEYS)
    job["quant"] = quant + ("+imatrix" if imatrix else "")
    job["imatrix"] = str(imatrix) if imatrix else None
    dst = output_path(out, job["quant"], fmt)
    written: Path | None = None
    try:
        start = time.perf_counter()
        written = convert(src, dst, fmt.name, from_=from_, quant=quant, progress=False,
                          registry=registry,
                          options={"imatrix": str(imatrix)} if imatrix else None)
        job["seconds_to_convert"] = time.perf_counter() - start
        job["size_bytes"] = size_on_disk(written)
        job["path"] = str(written) if keep else None
        with registry.open_session(written, fmt.name, session_options) as session:
            report = reference.compare(session, ctx)
            job["tokens_per_s"] = tokens_per_second(session, prompt, gen_tokens)
        job.update(ppl=report.ppl_cand, delta_ppl=report.delta_ppl,
                   delta_ppl_pct=report.delta_ppl_pct, kl_mean=report.kl_mean,
                   kl_p99=report.kl_p99, top1_agreement=report.top1_agreement)
        for key in ("ppl", "kl_mean"):
            if not math.isfinite(job[key]):
                raise ConvcoreError(f"the output's {key} is {job[key]}")
    except Exception as exc:  # noqa: BLE001 - one job's failure is recorded; the rest run
        job["error"] = one_line(exc)
    finally:
        if not keep and written is not None:
            target = written if not fmt.directory else dst
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            elif target.exists():
                target.unlink()
    return job


# reports ----------------------------------------------------------------------------
def finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None (JSON has no spelling for them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def _num(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def markdown(result: dict[str, Any]) -> str:
    """The sweep as Markdown: a line about the source and the text, the table, the
    recommendations."""
    src = Path(result["source"]).name
    lines = [
        f"Sweep of `{src}` ({result['source_format']}, {result['params'] / 1e6:.2f}M params, "
        f"{fmt_mb(result['source_size_bytes'])}) to {result['format']}: {result['tokens']} tokens "
        f"of {result['text']} in windows of {result['ctx']}; source perplexity "
        f"{_num(result['source_ppl'], '.4f')}, {_num(result['source_tokens_per_s'], '.1f')} tokens/s "
        f"in its own runtime. KL is mean KL(source‖output) in nats per token; bits/weight is the "
        f"file's size over the parameter count; tokens/s is greedy generation of "
        f"{result['gen_tokens']} tokens in the {result['format']} runtime (fastest of up to 3 runs).",
        "",
    ]
    failed = any(j["error"] for j in result["jobs"])
    lines += ["| type | size | bits/weight | PPL | ΔPPL | ΔPPL % | mean KL | KL p99 | top-1 | tokens/s "
              "| convert s | Pareto |" + (" error |" if failed else ""),
              "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|:-:|" + ("---|" if failed else "")]
    pareto = set(result["pareto"])
    params = result.get("params") or 0
    for j in by_size(result["jobs"]):
        if j["error"]:
            lines.append(f"| {j['quant']} | {fmt_mb(j['size_bytes'])} | | | | | | | | | "
                         f"{_num(j['seconds_to_convert'], '.1f')} | | "
                         f"{j['error'].replace('|', '/')} |")
            continue
        bpw = f"{8 * j['size_bytes'] / params:.2f}" if params else "-"
        lines.append(
            f"| {j['quant']} | {fmt_mb(j['size_bytes'])} | {bpw} | {_num(j['ppl'], '.4f')} | "
            f"{_num(j['delta_ppl'], '+.4f')} | {_num(j['delta_ppl_pct'], '+.2f')} | "
            f"{_num(j['kl_mean'], '.3e')} | {_num(j['kl_p99'], '.3e')} | "
            f"{_num(None if j['top1_agreement'] is None else 100 * j['top1_agreement'], '.1f')}% | "
            f"{_num(j['tokens_per_s'], '.1f')} | {_num(j['seconds_to_convert'], '.1f')} | "
            f"{'yes' if j['quant'] in pareto else ''} |" + (" |" if failed else ""))
    lines.append("")
    for rec in result["recommendations"].values():
        lines.append(f"- {rec['message']}")
    if result.get("plot_error"):
        lines.append(f"- no plot: {result['plot_error']}")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], png: Path, svg: Path) -> list[Path]:
    """Size on disk (MB) against mean KL, each point labelled with its type, the Pareto
    front connected, the budgets drawn. ImportError without matplotlib."""
    import matplotlib
    from matplotlib.figure import Figure

    jobs = [j for j in result["jobs"] if measured(j)]
    pareto = result["pareto"]
    fig = Figure(figsize=(9, 6), dpi=110)
    ax = fig.add_subplot()
    by_quant = {j["quant"]: j for j in jobs}
    x = np.array([j["size_bytes"] / 1e6 for j in jobs])
    y = np.array([j["kl_mean"] for j in jobs])
    positive = y[y > 0]
    floor = float(positive.min()) / 10 if positive.size else 1e-6
    if jobs:
        if positive.size == y.size and y.max() / max(y.min(), 1e-300) >= 10:
            ax.set_yscale("log")
        elif positive.size < y.size:  # a lossless type: KL 0 cannot sit on a log axis
            ax.set_yscale("symlog", linthresh=floor)
        if x.max() / max(x.min(), 1e-300) >= 10:
            ax.set_xscale("log")
        dominated = [j for j in jobs if j["quant"] not in pareto]
        if dominated:
            ax.scatter([j["size_bytes"] / 1e6 for j in dominated], [j["kl_mean"] for j in dominated],
                       s=36, facecolors="none", edgecolors="#888888", label="dominated", zorder=3)
        front = [by_quant[q] for q in pareto if q in by_quant]
        ax.plot([j["size_bytes"] / 1e6 for j in front], [j["kl_mean"] for j in front], "-o",
                color="#d62728", markersize=6, linewidth=1.5, label="Pareto front", zorder=4)
        picked = sorted({r.get("quant") for r in result["recommendations"].values()} - {None})
        if picked:
            ax.scatter([by_quant[q]["size_bytes"] / 1e6 for q in picked if q in by_quant],
                       [by_quant[q]["kl_mean"] for q in picked if q in by_quant], s=200,
                       facecolors="none", edgecolors="#ff7f0e", linewidths=1.8,
                       label="recommended", zorder=5)
        ax.margins(x=0.1, y=0.1)
    recs = result["recommendations"]
    ax.axhline(recs["smallest_within_kl"]["max_kl"], color="#1f77b4", linestyle="--", linewidth=1,
               label=f"KL budget {recs['smallest_within_kl']['max_kl']:g}")
    if recs["best_within_size"].get("max_size") is not None:
        ax.axvline(recs["best_within_size"]["max_size"] / 1e6, color="#2ca02c", linestyle=":",
                   linewidth=1.2, label=f"size budget {fmt_mb(recs['best_within_size']['max_size'])}")
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("mean KL(source ‖ output), nats/token")
    ax.set_title(f"{Path(result['source']).name} → {result['format']}: size vs KL "
                 f"({result['tokens']} tokens)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    _label_points(fig, ax, [(j["quant"], j["size_bytes"] / 1e6, j["kl_mean"]) for j in jobs])
    with matplotlib.rc_context({"svg.hashsalt": "convcore-sweep", "svg.fonttype": "path"}):
        fig.savefig(png, format="png", metadata={"Software": None})
        fig.savefig(svg, format="svg", metadata={"Date": None, "Creator": None})
    return [png, svg]


def _label_points(fig: Any, ax: Any, points: list[tuple[str, float, float]]) -> None:
    """Label each point with its type, beside it where the label covers no other label
    and no marker (close types such as q5_k_s / q5_k_m would print over each other)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.transforms import Bbox

    renderer = FigureCanvasAgg(fig).get_renderer()
    candidates = [(5, 5, "left"), (5, -13, "left"), (-5, 5, "right"), (-5, -13, "right"),
                  (7, -4, "left"), (-7, -4, "right"), (0, 9, "center"), (0, -17, "center"),
                  (5, 16, "left"), (5, -24, "left"), (-5, 16, "right"), (-5, -24, "right")]
    markers = []
    for _, x, y in points:
        px, py = ax.transData.transform((x, y))
        markers.append(Bbox.from_extents(px - 5, py - 5, px + 5, py + 5))
    placed: list[Any] = []

    def overlap(box: Any, others: list[Any]) -> float:
        total = 0.0
        for other in others:
            both = Bbox.intersection(box, other)
            if both is not None:
                total += both.width * both.height
        return total

    for i in sorted(range(len(points)), key=lambda k: (points[k][1], points[k][2])):
        label, x, y = points[i]
        others = [m for k, m in enumerate(markers) if k != i]
        best = None
        for dx, dy, ha in candidates:
            ann = ax.annotate(label, (x, y), xytext=(dx, dy), textcoords="offset points",
                              fontsize=9, ha=ha)
            box = ann.get_window_extent(renderer).expanded(1.08, 1.15)
            cost = overlap(box, placed + others)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, box)
            else:
                ann.remove()
            if cost == 0:
                break
        if best is not None:
            placed.append(best[2])


def summary(result: dict[str, Any]) -> str:
    """What the command prints: one line per job and the recommendations."""
    lines = [f"{'source':<10} {fmt_mb(result['source_size_bytes']):>11}  "
             f"{'(' + result['source_format'] + ')':<19}PPL {_num(result['source_ppl'], '.4f')}  "
             f"{_num(result['source_tokens_per_s'], '.1f')} tok/s"]
    for j in by_size(result["jobs"]):
        if j["error"]:
            lines.append(f"{j['quant']:<10} failed: {j['error']}")
        else:
            star = "  (Pareto)" if j["quant"] in result["pareto"] else ""
            lines.append(f"{j['quant']:<10} {fmt_mb(j['size_bytes']):>11}  mean KL {j['kl_mean']:.3e}  "
                         f"PPL {j['ppl']:.4f} ({j['delta_ppl_pct']:+.2f}%)  "
                         f"top-1 {100 * j['top1_agreement']:.1f}%  {_num(j['tokens_per_s'], '.1f')} tok/s{star}")
    for rec in result["recommendations"].values():
        lines.append(rec["message"])
    return "\n".join(lines)
