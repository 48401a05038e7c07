"""The ``convcore`` command line.

Every failure is one ``error: ...`` line on stderr and a non-zero exit; ``--debug``
shows the traceback instead.
"""
from __future__ import annotations

import json
import signal
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import click
import numpy as np

from .model import ConvcoreError, Model
from .options import parse_size  # noqa: F401 - kept importable as convcore.cli.parse_size
from .pipeline import convert
from .registry import get_registry


def parse_pairs(pairs: tuple[str, ...], what: str) -> dict[str, str]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConvcoreError(f"{what} {pair!r} is not KEY=VALUE")
        key, value = pair.split("=", 1)
        out[key.strip()] = value
    return out


def parse_tokens(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ConvcoreError(f"--tokens {text!r} is not a comma list of integers") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--jobs", type=int, help="Threads for quantization (default: up to 4).")
@click.option("--force", is_flag=True,
              help="Replace DST when it is a previous output of this format (never other files).")
@click.option("--no-validate", is_flag=True, help="Skip validating the output.")
@click.option("--check", is_flag=True, help="Compare logits of source and output afterwards.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def run(src: Path, dst: Path, from_: str | None, to: str, quant: str | None, dtype: str | None,
        metadata: tuple[str, ...], extra: tuple[str, ...], split_max_size: str | None,
        split_max_tensors: int | None, vocab_only: bool, dry_run: bool, jobs: int | None,
        force: bool, no_validate: bool, check: bool, quiet: bool) -> None:
    """Convert SRC to format --to at DST."""
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
    written = convert(src, dst, to, from_=from_, quant=quant, dtype=dtype,
                      metadata=parse_pairs(metadata, "--metadata"), jobs=jobs, force=force,
                      validate=not no_validate, options=options, progress=not quiet)
    if dry_run:
        return
    click.echo(f"wrote {written}", err=True)
    if check:
        report = compare_logits(src, written, from_, to, None)
        click.echo(json.dumps(report, indent=2))


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


@cli.command()
@click.argument("name", required=False, metavar="[FMT]")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
def formats(name: str | None, as_json: bool) -> None:
    """List formats: read/write, the schemes each can store and its options (-O)."""
    registry = get_registry()
    chosen = [registry.format(name)] if name else sorted(registry.formats.values(), key=lambda f: f.name)
    rows = [{"format": f.name, "read": f.can_read, "write": f.can_write,
             "kind": "directory" if f.directory else "file", "plugin": f.plugin,
             "schemes": list(f.all_schemes), "options": [o.describe() for o in f.options],
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


def size_on_disk(path: Path) -> int:
    """Bytes of the file, or of every file under the directory (links followed, as a
    hub cache snapshot's files are links into its blobs)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


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
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--format", "fmt", metavar="FMT", help="Format (detected when omitted).")
def validate(path: Path, fmt: str | None) -> None:
    """Check PATH; exit 0 when valid, 1 with one line per problem otherwise."""
    problems = get_registry().validate(path, fmt)
    if problems:
        for p in problems:
            click.echo(f"invalid: {p}", err=True)
        raise SystemExit(1)
    click.echo(f"{path}: valid")


def tokenizer_for(path: Path, fmt: str | None) -> Any:
    """A transformers tokenizer built from the model's own tokenizer files."""
    model = get_registry().load(path, fmt)
    if not model.tokenizer:
        raise ConvcoreError(f"{path}: has no tokenizer; pass --tokens")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConvcoreError("--prompt needs transformers (pip install transformers); "
                            "or pass --tokens") from None
    tmp = Path(tempfile.mkdtemp(prefix="convcore-tok-"))
    for name, data in model.tokenizer.items():
        (tmp / name).write_bytes(data)
    (tmp / "config.json").write_text(json.dumps(model.config))
    return AutoTokenizer.from_pretrained(str(tmp))


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--prompt", help="Text to tokenize with the model's tokenizer.")
@click.option("--tokens", help="Comma list of token ids (generated ids are printed as ids).")
@click.option("--max-tokens", type=int, default=0, help="Greedy-generate this many tokens.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-text tokens.")
@click.option("--logits", "logits_out", type=click.Path(path_type=Path), help="Save logits (.npy).")
@click.option("--threads", type=int, help="Threads for the runtime (default: its own).")
@click.option("--verbose", is_flag=True, help="Let the runtime's own log through.")
@click.option("--format", "fmt", metavar="FMT", help="Format (detected when omitted).")
def infer(path: Path, prompt: str | None, tokens: str | None, max_tokens: int, ignore_eos: bool,
          logits_out: Path | None, threads: int | None, verbose: bool, fmt: str | None) -> None:
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
    with registry.open_session(path, fmt, options) as session:
        logits = session.logits(ids)
        if logits_out:
            np.save(logits_out, logits)
        stop: tuple[int, ...] = ()
        if not ignore_eos:
            stop = tuple(session.stop_ids)
            if tok is not None and tok.eos_token_id is not None:
                stop += (int(tok.eos_token_id),)
        generated = list(session.extend(logits[-1], max_tokens, stop))
    if generated:
        click.echo(tok.decode(generated) if tok is not None else ",".join(map(str, generated)))
    else:
        top = np.argsort(-logits[-1])[:5]
        click.echo(json.dumps({"tokens": ids, "shape": list(logits.shape),
                               "top5_next": [int(t) for t in top]}))


def compare_logits(ref: Path, cand: Path, ref_fmt: str | None, cand_fmt: str | None,
                   tokens: list[int] | None) -> dict[str, Any]:
    """Logits of REF and CANDIDATE in their own runtimes on the same ids."""
    registry = get_registry()
    if tokens is None:
        vocab = int(registry.load(ref, ref_fmt).config.get("vocab_size", 100))
        tokens = [int(t) for t in np.random.default_rng(0).integers(3, vocab, 16)]
    logits = []
    for path, fmt in ((ref, ref_fmt), (cand, cand_fmt)):
        with registry.open_session(path, fmt, {"n_ctx": len(tokens)}) as session:
            logits.append(session.logits(tokens).astype(np.float64))
    a, b = logits
    if a.shape != b.shape:
        raise ConvcoreError(f"logit shapes differ: {list(a.shape)} vs {list(b.shape)}")
    pa = np.exp(a - a.max(-1, keepdims=True))
    pa /= pa.sum(-1, keepdims=True)
    lb = b - b.max(-1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
    la = np.log(pa)
    return {
        "tokens": len(tokens),
        "max_abs_diff": float(np.abs(a - b).max()),
        "rel_error": float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30)),
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
        "kl_ref_cand": float((pa * (la - lb)).sum(-1).mean()),
    }


@cli.command()
@click.argument("ref", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option("--tokens", help="Comma list of token ids (default: 16 fixed random ids).")
@click.option("--tensors", "per_tensor", is_flag=True, help="Also compare weights tensor by tensor.")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
def compare(ref: Path, candidate: Path, tokens: str | None, per_tensor: bool, as_json: bool) -> None:
    """Compare CANDIDATE against REF: logits in each format's runtime, optionally weights."""
    report = compare_logits(ref, candidate, None, None, parse_tokens(tokens) if tokens else None)
    if per_tensor:
        registry = get_registry()
        ma, mb = registry.load(ref), registry.load(candidate)
        rows = {}
        # loaders restore HF names, so tensors pair by name; the candidate format's own
        # names (blk.0.ffn_down.weight, ...) are shown beside them
        native = registry.map_names(ma, mb.format)
        if native:
            report["candidate_names"] = {k: v for k, v in native.items() if k in ma.tensors}
        for name, ra in ma.tensors.items():
            rb = mb.tensors.get(name)
            if rb is None or rb.shape != ra.shape:
                rows[name] = None
                continue
            x = ra.load().astype(np.float64)
            y = rb.load().astype(np.float64)
            rows[name] = float(np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-30))
        report["tensors"] = rows
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for k, v in report.items():
            if k not in ("tensors", "candidate_names"):
                click.echo(f"{k}: {v}")
        names = report.get("candidate_names", {})
        for name, err in report.get("tensors", {}).items():
            shown = f"{name} ({names[name]})" if name in names else name
            click.echo(f"  {shown}: {'missing' if err is None else f'{err:.3e}'}")


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
    try:
        rv = cli.main(args=args, prog_name="convcore", standalone_mode=False)
    except (click.exceptions.Abort, Terminated, KeyboardInterrupt):
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
