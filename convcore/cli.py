"""The ``convcore`` command line.

Every failure is one ``error: ...`` line on stderr and a non-zero exit; ``--debug``
shows the traceback instead.
"""
from __future__ import annotations

import json
import signal
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import click
import numpy as np

from .destination import size_on_disk
from .model import ConvcoreError, Model
from .options import parse_pairs, parse_size  # noqa: F401 - kept importable from convcore.cli
from .pipeline import convert
from . import fidelity, multimodal
from .fidelity import CHECK_FAILED_EXIT
from .pooling import is_encoder
from .cli_group import Interrupted, _Group
from .registry import CONTRACT, get_registry
from .lora import parse_lora

LORA_HELP = ("Apply a LoRA adapter in the runtime: an adapter GGUF for gguf, an mlx-lm adapter "
             "folder for mlx, a PEFT folder for hf; repeatable where the runtime allows.")


def parse_tokens(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ConvcoreError(f"--tokens {text!r} is not a comma list of integers") from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(package_name="convcore")
def cli(debug: bool) -> None:
    """Convert and quantize ML models: HF, GGUF, MLX and more, through plugins."""


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", "dst", required=True, type=click.Path(path_type=Path),
              help="Output file (gguf, parquet) or directory (hf, mlx, onnx, npz).")
@click.option("--from", "from_", metavar="FMT", help="Source format (detected when omitted).")
@click.option("--to", "to", required=True, metavar="FMT", help="Target format.")
@click.option("--quant", metavar="SCHEME", help="Quantization scheme or float type.")
@click.option("--dtype", type=click.Choice(["f32", "f16", "bf16"]),
              help="Type of what stays unquantized (default: the source's).")
@click.option("--metadata", "metadata", multiple=True, metavar="KEY=VALUE",
              help="Metadata to record in the output.")
@click.option("-O", "--option", "extra", multiple=True, metavar="KEY=VALUE",
              help="Format-specific option passed to the writer.")
@click.option("--split-max-size", metavar="SIZE", help="Shard outputs at this size (e.g. 2G).")
@click.option("--split-max-tensors", type=int, help="Shard outputs at this many tensors.")
@click.option("--vocab-only", is_flag=True, help="Write the vocabulary only (gguf).")
@click.option("--dry-run", is_flag=True, help="Print the plan; write nothing.")
@click.option("--imatrix", type=click.Path(path_type=Path),
              help="Importance matrix guiding quantization (gguf; `convcore imatrix` makes one).")
@click.option("--base", type=click.Path(path_type=Path),
              help="Base model of an adapter SRC (default: the base its config names).")
@click.option("--lora", "loras", multiple=True, metavar="ADAPTER[:SCALE]",
              help="Merge a LoRA adapter (PEFT or mlx-lm) into the weights as they stream; repeatable.")
@click.option("--jobs", type=int, help="Threads for quantization (default: up to 4).")
@click.option("--force", is_flag=True,
              help="Replace DST when it is a previous output of this format (never other files).")
@click.option("--no-validate", is_flag=True, help="Skip validating the output.")
@click.option("--check", is_flag=True,
              help=f"Compare the output with the source on the bundled text afterwards; exit "
                   f"{CHECK_FAILED_EXIT} when beyond the scheme's tolerance.")
@click.option("--check-kl", type=float, help="--check: largest mean KL allowed (default: the scheme's).")
@click.option("--check-top1", type=float, help="--check: smallest top-1 agreement allowed.")
@click.option("--check-tokens", type=int, default=1024, show_default=True,
              help="--check: how many tokens of the text to run.")
@click.option("--allow-nonfinite", is_flag=True,
              help="Convert tensors holding NaN or Inf (refused by default, naming the tensor).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def run(src: Path, dst: Path, from_: str | None, to: str, quant: str | None, dtype: str | None,
        metadata: tuple[str, ...], extra: tuple[str, ...], split_max_size: str | None,
        split_max_tensors: int | None, vocab_only: bool, dry_run: bool, imatrix: Path | None,
        base: Path | None, loras: tuple[str, ...], jobs: int | None,
        force: bool, no_validate: bool, check: bool, quiet: bool, check_kl: float | None = None,
        check_top1: float | None = None, check_tokens: int = 1024, allow_nonfinite: bool = False) -> None:
    """Convert SRC to format --to at DST."""
    if check and (loras or base):
        raise ConvcoreError("--check compares the output with its source; for an adapter or a merge "
                            "use convcore compare with --lora / --ref-lora")
    options: dict[str, Any] = parse_pairs(extra, "--option")
    # the format flags are options like any -O key, checked against the target's list
    if split_max_size:
        options["split_max_size"] = split_max_size
    if split_max_tensors:
        options["split_max_tensors"] = split_max_tensors
    if vocab_only:
        options["vocab_only"] = True
    if dry_run:
        options["dry_run"] = True
    if imatrix is not None:
        options["imatrix"] = str(imatrix)
    written = convert(src, dst, to, from_=from_, quant=quant, dtype=dtype,
                      metadata=parse_pairs(metadata, "--metadata"), jobs=jobs, force=force,
                      validate=not no_validate, options=options, progress=not quiet,
                      allow_nonfinite=allow_nonfinite, base=base, loras=loras)
    if dry_run:
        return
    click.echo(f"wrote {written}", err=True)
    if check:
        report, tolerance, broken = fidelity.check_output(
            get_registry(), src, written, from_, to, quant, dtype, kl=check_kl, top1=check_top1,
            tokens=check_tokens)
        click.echo(format_report(report, src, written), err=True)
        if broken:
            click.echo(f"error: --check: {written} is beyond tolerance: {'; '.join(broken)}", err=True)
            raise SystemExit(CHECK_FAILED_EXIT)
        click.echo(f"check passed: within {json.dumps(tolerance)}", err=True)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@click.option("--all", "show_all", is_flag=True, help="Include built-in plugins.")
def plugins(as_json: bool, show_all: bool) -> None:
    """List installed plugins: version, hooks, formats, schemes, load errors."""
    registry = get_registry()
    rows = [info.__dict__ for info in registry.infos.values() if show_all or not info.builtin]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no plugins installed (built-ins hidden; --all shows them)")
    for r in rows:
        line = f"{r['name']} {r['version']}".strip()
        if r["error"]:
            click.echo(f"{line}: failed to load: {r['error']}")
            continue
        click.echo(f"{line}: formats [{', '.join(r['formats'])}] schemes "
                   f"[{len(r['schemes'])}] hooks [{', '.join(h.removeprefix('convcore_') for h in r['hooks'])}]")
        for note in r["deprecations"]:
            click.echo(f"  deprecated: {note}")
    click.echo(f"plugin contract {CONTRACT} (plugins written to earlier versions load; docs/plugins.md)")


@cli.command()
@click.argument("name", required=False, metavar="[FMT]")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@click.option("--archs", is_flag=True,
              help="The architecture x format matrix: w written, r read back, + checked in the runtime.")
def formats(name: str | None, as_json: bool, archs: bool = False) -> None:
    """List formats: read/write, the schemes each can store and its options (-O)."""
    registry = get_registry()
    if archs:
        from .archmatrix import markdown, matrix
        table = matrix(registry)
        click.echo(json.dumps(table, indent=2) if as_json else markdown(table), nl=as_json)
        return
    chosen = [registry.format(name)] if name else sorted(registry.formats.values(), key=lambda f: f.name)
    rows = [{"format": f.name, "read": f.can_read, "write": f.can_write,
             "kind": "directory" if f.directory else "file", "plugin": f.plugin,
             "schemes": list(f.all_schemes), "outputs": list(f.outputs),
             "options": [o.describe() for o in f.options],
             "description": f.description}
            for f in chosen]
    if as_json:
        click.echo(json.dumps(rows[0] if name else rows, indent=2))
        return
    for r in rows:
        rw = ("r" if r["read"] else "-") + ("w" if r["write"] else "-")
        click.echo(f"{r['format']:<10} {rw}  {r['kind']:<9} {', '.join(r['schemes'])}")
        if name:
            click.echo(f"  {r['description']} (plugin {r['plugin']})")
            click.echo("  options (-O KEY=VALUE):" if r["options"] else "  options: none")
            for o in r["options"]:
                kind = "|".join(o["choices"]) if o.get("choices") else o["type"]
                default = "" if o["default"] is None else f" (default {o['default']})"
                click.echo(f"    {o['name']}={kind}{default}  {o['help']}")


def summarise(model: Model) -> dict[str, Any]:
    by_dtype: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "params": 0, "bytes": 0})
    for ref in model.tensors.values():
        row = by_dtype[ref.stored or ref.dtype]
        row["tensors"] += 1
        row["params"] += ref.numel
        row["bytes"] += ref.file_nbytes
    cfg = model.config
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size", "max_position_embeddings", "tie_word_embeddings")
    return {
        "path": model.source, "format": model.format, "arch": model.arch,
        "params": model.num_params, "tensors": len(model.tensors),
        "size_bytes": size_on_disk(Path(model.source)) if model.source else None,
        "tensors_by_dtype": dict(by_dtype),
        "config": {k: cfg[k] for k in keys if k in cfg},
        "tokenizer_files": sorted(model.tokenizer),
        "metadata": {k: v for k, v in model.metadata.items() if isinstance(v, (str, int, float, bool))},
        **({"image_text": multimodal.parts(model)} if multimodal.is_image_text(model) else {}),
        **({"adapter": {k: v for k, v in model.metadata["adapter"].items() if k != "scales"}
            | {"weights": len(model.metadata["adapter"]["scales"])}}
           if model.metadata.get("adapter") else {}),
    }


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--from", "fmt", metavar="FMT", help="Format (detected when omitted).")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@click.option("--tensors", "list_tensors", is_flag=True, help="List every tensor.")
def inspect(path: Path, fmt: str | None, as_json: bool, list_tensors: bool) -> None:
    """Show format, architecture, parameter count, tensors by dtype and metadata."""
    model = get_registry().load(path, fmt)
    info = summarise(model)
    if list_tensors:
        info["tensor_list"] = [[r.name, r.stored or r.dtype, list(r.shape)] for r in model.tensors.values()]
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    size = f", {info['size_bytes'] / 1e6:.1f} MB on disk" if info["size_bytes"] is not None else ""
    click.echo(f"{info['path']}: {info['format']} {info['arch']}, "
               f"{info['params'] / 1e6:.2f}M params in {info['tensors']} tensors{size}")
    if info["metadata"].get("source_quantization"):
        click.echo(f"  quantized source: {info['metadata']['source_quantization']} (read as float32)")
    if "image_text" in info:
        lang, vis, proj = (info["image_text"][k] for k in ("language", "vision", "projector"))
        click.echo(f"  language model: {lang['family']}, {lang['params'] / 1e6:.2f}M params, "
                   f"{lang.get('num_hidden_layers', '?')} layers, hidden {lang.get('hidden_size', '?')}")
        click.echo(f"  vision tower: {vis.get('model_type', '?')}, {vis['params'] / 1e6:.2f}M params, "
                   f"{vis.get('num_hidden_layers', '?')} layers, hidden {vis.get('hidden_size', '?')}, "
                   f"image {vis.get('image_size', '?')} px in patches of {vis.get('patch_size', '?')}")
        click.echo(f"  projector: {proj['params'] / 1e6:.2f}M params"
                   + (f", {proj['mm_tokens_per_image']} tokens per image" if "mm_tokens_per_image" in proj else ""))
    if "adapter" in info:
        ad = info["adapter"]
        click.echo(f"  LoRA adapter ({ad['source_format']}): rank {ad['rank']}, alpha {ad['alpha']:g}"
                   f"{', rsLoRA' if ad['rslora'] else ''}, {ad['weights']} weights adapted"
                   f"{', replaces ' + ', '.join(ad['replaced']) if ad['replaced'] else ''}; base {ad['base']}")
    for dtype, row in sorted(info["tensors_by_dtype"].items()):
        click.echo(f"  {dtype:<8} {row['tensors']:>5} tensors {row['params']:>14,} params "
                   f"{row['bytes'] / 1e6:>10.2f} MB stored")
    for k, v in info["config"].items():
        click.echo(f"  {k}: {v}")
    if info["tokenizer_files"]:
        click.echo(f"  tokenizer: {', '.join(info['tokenizer_files'])}")
    for name, dtype, shape in info.get("tensor_list", []):
        click.echo(f"  {name} {dtype} {shape}")


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--format", "fmt", metavar="FMT", help="Format (detected when omitted).")
def validate(paths: tuple[Path, ...], fmt: str | None) -> None:
    """Check each PATH; exit 0 when all are valid, 1 with one line per problem otherwise
    (every path is checked, and one that cannot be read is a problem of its own)."""
    bad = False
    for path in paths:
        try:
            problems = get_registry().validate(path, fmt)
        except ConvcoreError as exc:
            problems = [str(exc)]
        for p in problems:
            click.echo(f"invalid: {p}", err=True)
        bad = bad or bool(problems)
        if not problems:
            click.echo(f"{path}: valid")
    if bad:
        raise SystemExit(1)


def tokenizer_for(path: Path, fmt: str | None) -> Any:
    """A transformers tokenizer built from the model's own tokenizer files."""
    model = get_registry().load(path, fmt)
    if not model.tokenizer:
        raise ConvcoreError(f"{path}: has no tokenizer; pass --tokens")
    return fidelity.tokenizer_for(model)


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--prompt", help="Text to tokenize with the model's tokenizer.")
@click.option("--tokens", help="Comma list of token ids (generated ids are printed as ids).")
@click.option("--max-tokens", type=int, default=0, help="Greedy-generate this many tokens.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-text tokens.")
@click.option("--logits", "logits_out", type=click.Path(path_type=Path), help="Save logits (.npy).")
@click.option("--embedding", "embedding_out", type=click.Path(path_type=Path),
              help="Encoders: save the sentence embedding (.npy).")
@click.option("--threads", type=int, help="Threads for the runtime (default: its own).")
@click.option("--verbose", is_flag=True, help="Let the runtime's own log through.")
@click.option("--format", "fmt", metavar="FMT", help="Format (detected when omitted).")
@click.option("--lora", "loras", multiple=True, metavar="ADAPTER[:SCALE]", help=LORA_HELP)
def infer(path: Path, prompt: str | None, tokens: str | None, max_tokens: int, ignore_eos: bool,
          logits_out: Path | None, embedding_out: Path | None, threads: int | None, verbose: bool,
          fmt: str | None, loras: tuple[str, ...] = ()) -> None:
    """Run PATH in its format's own runtime, loaded once: print the top next tokens, or
    generate greedily with the runtime's KV cache."""
    if (prompt is None) == (tokens is None):
        raise ConvcoreError("pass exactly one of --prompt and --tokens")
    tok = tokenizer_for(path, fmt) if prompt is not None else None
    ids = tok(prompt).input_ids if tok is not None else parse_tokens(tokens or "")
    if not ids:
        raise ConvcoreError("no tokens to run")
    registry = get_registry()
    options: dict[str, Any] = {"n_ctx": len(ids) + max_tokens, "verbose": verbose}
    if threads:
        options["threads"] = threads
    if loras:
        options["lora"] = [parse_lora(spec) for spec in loras]
    with registry.open_session(path, fmt, options) as session:
        if session.kind == "encoder":
            if max_tokens:
                raise ConvcoreError(f"{path}: an embedding model (encoder) does not generate; "
                                    "drop --max-tokens")
            embedding = np.asarray(session.embed(ids), dtype=np.float32)
            if embedding_out:
                np.save(embedding_out, embedding)
            click.echo(json.dumps({"kind": "encoder", "tokens": ids, "dim": int(embedding.shape[0]),
                                   "norm": float(np.linalg.norm(embedding)),
                                   "embedding_head": [round(float(v), 6) for v in embedding[:8]]}))
            return
        logits = session.logits(ids)
        if logits_out:
            np.save(logits_out, logits)
        stop = () if ignore_eos else session.end_ids(tok)
        generated = list(session.extend(logits[-1], max_tokens, stop))
    if generated:
        click.echo(tok.decode(generated) if tok is not None else ",".join(map(str, generated)))
    else:
        top = np.argsort(-logits[-1])[:5]
        click.echo(json.dumps({"tokens": ids, "shape": list(logits.shape),
                               "top5_next": [int(t) for t in top]}))


def compare_models(ref: Path, cand: Path, ref_fmt: str | None, cand_fmt: str | None, *,
                   text: Path | None, ctx: int | None, limit: int | None,
                   tokens: list[int] | None = None, ref_lora: tuple[str, ...] = (),
                   cand_lora: tuple[str, ...] = ()) -> fidelity.Report:
    """REF and CANDIDATE in their own runtimes on the same windows of token ids."""
    return fidelity.compare_paths(get_registry(), ref, cand, ref_fmt, cand_fmt, text=text,
                                  ctx=ctx, limit=limit, tokens=tokens,
                                  ref_lora=[parse_lora(s) for s in ref_lora],
                                  cand_lora=[parse_lora(s) for s in cand_lora])


def format_report(report: fidelity.Report, ref: Path, cand: Path) -> str:
    r = report
    rows = [("reference", str(ref)), ("candidate", str(cand)),
            ("tokens", f"{r.tokens} in {r.windows} window(s) of <= {r.ctx}"),
            ("perplexity", f"{r.ppl_ref:.4f} -> {r.ppl_cand:.4f}  (ΔPPL {r.delta_ppl:+.4f}, {r.delta_ppl_pct:+.3f}%)"),
            ("KL(ref||cand)", f"mean {r.kl_mean:.3e}  p99 {r.kl_p99:.3e}  max {r.kl_max:.3e}"),
            ("top-1 agreement", f"{100 * r.top1_agreement:.2f}%"),
            ("max |Δlogit|", f"{r.max_abs_diff:.4g}  (relative RMS {r.rel_error:.3e})")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def tensor_errors(ref: Path, cand: Path) -> dict[str, Any]:
    """Relative RMSE of every candidate weight against the reference's, by HF name, worst
    first; the candidate format's own names beside them."""
    registry = get_registry()
    ma, mb = registry.load(ref), registry.load(cand)
    native = registry.map_names(ma, mb.format) or {}
    rows: dict[str, float | None] = {}
    for name, ra in ma.tensors.items():
        rb = mb.tensors.get(name)
        if rb is None or rb.shape != ra.shape:
            rows[name] = None
            continue
        x = ra.load().astype(np.float64)
        y = rb.load().astype(np.float64)
        rows[name] = float(np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-30))
    order = sorted(rows, key=lambda n: -1.0 if rows[n] is None else -rows[n])
    return {"tensors": {n: rows[n] for n in order},
            "candidate_names": {k: v for k, v in native.items() if k in ma.tensors}}


@cli.command()
@click.argument("ref", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option("--text", type=click.Path(path_type=Path),
              help="Text to run (default: the bundled English evaluation text).")
@click.option("--tokens", help="Comma list of token ids instead of a text.")
@click.option("--ctx", type=int, help="Window length in tokens (default: 512 or the model's context).")
@click.option("--limit", type=int, help="Use at most this many tokens of the text.")
@click.option("--tensors", "per_tensor", is_flag=True, help="Also compare weights tensor by tensor.")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@click.option("--ref-lora", "ref_loras", multiple=True, metavar="ADAPTER[:SCALE]",
              help="Apply a LoRA adapter to REF in its runtime (as infer --lora).")
@click.option("--lora", "loras", multiple=True, metavar="ADAPTER[:SCALE]",
              help="Apply a LoRA adapter to CANDIDATE in its runtime (as infer --lora).")
def compare(ref: Path, candidate: Path, text: Path | None, tokens: str | None, ctx: int | None,
            limit: int | None, per_tensor: bool, as_json: bool, ref_loras: tuple[str, ...] = (),
            loras: tuple[str, ...] = ()) -> None:
    """Compare CANDIDATE against REF, each in its own runtime: perplexity of both, ΔPPL,
    KL(ref‖cand) mean and 99th percentile, top-1 agreement, largest logit difference;
    with --tensors the relative RMSE of every weight."""
    if text is not None and tokens is not None:
        raise ConvcoreError("pass at most one of --text and --tokens")
    registry = get_registry()
    ref_model = registry.load(ref)
    if is_encoder(ref_model.config):
        if ref_loras or loras:
            raise ConvcoreError(f"{ref}: --lora is for decoder models")
        sentences = ([parse_tokens(tokens)] if tokens else fidelity.text_sentences(
            fidelity.tokenizer_for(ref_model), fidelity.read_text(text)))
        with registry.open_session(ref) as a, registry.open_session(candidate) as b:
            enc = fidelity.compare_encoders(a, b, sentences)
        if per_tensor:
            enc.update(tensor_errors(ref, candidate))
        if as_json:
            click.echo(json.dumps(enc, indent=2))
            return
        hidden = enc["hidden_max_abs_diff"]
        click.echo(f"reference        {ref}\ncandidate        {candidate}\n"
                   f"sentences        {enc['sentences']}\n"
                   f"embedding cosine mean {enc['cosine_mean']:.6f}  min {enc['cosine_min']:.6f}\n"
                   f"max |Δhidden|    {'n/a (a runtime without hidden states)' if hidden is None else f'{hidden:.4g}'}")
        return
    report = compare_models(ref, candidate, None, None, text=text, ctx=ctx, limit=limit,
                            tokens=parse_tokens(tokens) if tokens else None,
                            ref_lora=ref_loras, cand_lora=loras)
    out: dict[str, Any] = report.as_dict()
    if per_tensor:
        out.update(tensor_errors(ref, candidate))
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(format_report(report, ref, candidate))
    if per_tensor:
        names = out["candidate_names"]
        click.echo("weights (relative RMSE, worst first):")
        for name, err in out["tensors"].items():
            shown = f"{name} ({names[name]})" if name in names else name
            click.echo(f"  {shown}: {'missing' if err is None else f'{err:.3e}'}")


@cli.command()
@click.argument("names", nargs=-1, metavar="[SCHEME]...")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=None,
              help="Worker processes (default: the CPUs this process may use).")
def warmup(names: tuple[str, ...], jobs: int | None) -> None:
    """Compile (or load) every quantization scheme's kernels ahead of first use.

    Scheme plugins keep compiled kernels in an on-disk cache; this fills it for the named
    SCHEMEs (default: all registered) and every float input type, so the first conversion
    after an install does not wait for compiles. Safe to run again."""
    import time

    from . import warmup as warm

    todo = warm.schemes(list(names) or None)
    start = time.perf_counter()
    failed = warm.warm(todo, jobs or warm.default_jobs())
    for name, error in failed.items():
        click.echo(f"warning: {name}: {error}", err=True)
    click.echo(f"{len(todo) - len(failed)} of {len(todo)} schemes ready in "
               f"{time.perf_counter() - start:.1f} s", err=True)
    if failed:
        raise SystemExit(1)


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", "dst", required=True, type=click.Path(path_type=Path),
              help="The HF folder to write.")
@click.option("--init", type=click.Choice(["random", "zeros"]), default="random", show_default=True,
              help="random: N(0, initializer_range), norms 1, biases 0; zeros: zeros, norms 1.")
@click.option("--dtype", type=click.Choice(["f32", "f16", "bf16"]), help="Type of the weights (default: the config's).")
@click.option("--layers", type=click.IntRange(min=1), help="Keep the first N layers (a small stand-in).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random values.")
@click.option("--force", is_flag=True, help="Replace DST when it is a previous hf output.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def fake(src: Path, dst: Path, init: str, dtype: str | None, layers: int | None, seed: int, force: bool,
         quiet: bool) -> None:
    """Write an HF checkpoint of SRC's architecture (a model folder or a config.json) with
    generated weights of its exact shapes, plus its tokenizer and companion files; streamed,
    so any size costs a block of memory. `run SRC --from fake` converts one to any format."""
    from .builtins.fake import describe, load_fake
    from .hub import resolve

    src = resolve(src, weights=False)   # a hub id: its config and tokenizer, never its weights
    options = {"init": init, "seed": seed, "layers": layers}
    click.echo(describe(load_fake(src, options)), err=True)
    written = convert(src, dst, "hf", from_="fake", dtype=dtype, force=force, progress=not quiet,
                      load_options=options)
    click.echo(f"wrote {written}", err=True)


@cli.command("new-plugin")
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(path_type=Path), default=None,
              help="Where to create it (default: ./convcore-NAME).")
def new_plugin(name: str, directory: Path | None) -> None:
    """Scaffold a plugin distribution for a format NAME: pyproject with the entry point,
    hook implementations with declared options, tests running the conformance suite."""
    from .scaffold import create_plugin

    out = create_plugin(name, directory)
    click.echo(f"created {out}; next: pip install -e {out} && convcore plugins", err=True)




class Terminated(BaseException):
    """Raised by the SIGTERM handler; a BaseException so nothing swallows it."""


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning every failure into one ``error:`` line."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args

    def on_sigterm(signum: int, frame: Any) -> None:
        raise Terminated  # unwinds through the pipeline, which removes its temp output

    signal.signal(signal.SIGTERM, on_sigterm)
    # damaged weights can overflow a cast or a dequantizer: numpy's warnings would print
    # lines of their own, and the pipeline names non-finite weights itself
    import numpy as np
    np.seterr(over="ignore", invalid="ignore", divide="ignore", under="ignore")
    try:
        rv = cli.main(args=args, prog_name="convcore", standalone_mode=False)
    except (click.exceptions.Abort, Terminated, Interrupted, KeyboardInterrupt):
        click.echo("error: interrupted", err=True)
        raise SystemExit(130) from None
    except click.ClickException as exc:
        if debug:
            raise
        click.echo(f"error: {exc.format_message()}".replace("\n", " "), err=True)
        raise SystemExit(exc.exit_code) from None
    except SystemExit:
        raise
    except ConvcoreError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}".replace("\n", " "), err=True)
        raise SystemExit(1) from None
    except Exception as exc:  # noqa: BLE001 - the contract is one line, no traceback
        if debug:
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        click.echo(f"error: {type(exc).__name__}: {first} (rerun with --debug for details)", err=True)
        raise SystemExit(1) from None
    if isinstance(rv, int) and rv:
        raise SystemExit(rv)
