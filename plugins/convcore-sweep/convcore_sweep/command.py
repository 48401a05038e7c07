"""The ``convcore sweep`` command, added to the CLI through ``convcore_register_commands``."""
from __future__ import annotations

import json
from pathlib import Path

import click


@click.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--to", "to", required=True, metavar="FMT", help="Target format.")
@click.option("--from", "from_", metavar="FMT", help="Source format (detected when omitted).")
@click.option("--quant", metavar="A,B,C", help="Comma list of types to try (adds to --all).")
@click.option("--all", "use_all", is_flag=True,
              help="Every scheme the target format lists (f32/f16/bf16 only when in --quant).")
@click.option("--text", type=click.Path(path_type=Path),
              help="Text to measure on (default: the bundled English evaluation text).")
@click.option("--ctx", type=int, help="Window length in tokens (default: 512 or the model's context).")
@click.option("--limit", type=int, help="Use at most this many tokens of the text.")
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path),
              help="Directory for the results (default: ./sweep-<src name>-<fmt>).")
@click.option("--max-kl", type=float, default=0.05, show_default=True,
              help="KL budget: recommend the smallest type with mean KL at most this.")
@click.option("--max-size", metavar="SIZE",
              help="Size budget (e.g. 600M, 2G): recommend the lowest-KL type within it.")
@click.option("--gen-tokens", type=int, default=32, show_default=True,
              help="Tokens to generate when timing each runtime.")
@click.option("--keep/--no-keep", default=True, show_default=True,
              help="Keep the converted outputs under DIR/outputs (or delete each once measured).")
@click.option("--force", is_flag=True, help="Replace a previous sweep in DIR (never other files).")
@click.option("--json", "as_json", is_flag=True, help="Print sweep.json instead of the summary.")
@click.option("--imatrix", type=click.Path(path_type=Path),
              help="Importance matrix: run each type without and with it (+imatrix).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def sweep(src: Path, to: str, from_: str | None, quant: str | None, use_all: bool,
          text: Path | None, ctx: int | None, limit: int | None, out_dir: Path | None,
          max_kl: float, max_size: str | None, gen_tokens: int, keep: bool, force: bool,
          as_json: bool, quiet: bool, imatrix: Path | None = None) -> None:
    """Convert SRC to each quantization type of --quant (or --all) and measure each:
    size, perplexity and ΔPPL, KL against SRC, generation speed. Writes sweep.json,
    sweep.md and a size/KL plot (sweep.png, sweep.svg) into DIR and recommends the
    smallest type within --max-kl and the best within --max-size. Exit 1 when every
    type failed."""
    from convcore.options import parse_size as size

    from . import sweep as sweeping

    quants = sweeping.parse_quants(quant, to, use_all)
    result = sweeping.sweep(src, to, quants, out_dir, text=text, ctx=ctx, limit=limit,
                            gen_tokens=gen_tokens, keep=keep, max_kl=max_kl,
                            max_size=size(max_size) if max_size else None, from_=from_,
                            force=force, progress=not quiet, imatrix=imatrix)
    files = result.pop("files")
    plot_error = result.pop("plot_error", None)
    if as_json:
        click.echo(json.dumps(sweeping.finite(result), indent=2))
    else:
        click.echo(sweeping.summary(result))
    if plot_error:
        click.echo(f"note: {plot_error}", err=True)
    click.echo(f"wrote {', '.join(files)}", err=True)
    if not any(j["error"] is None for j in result["jobs"]):
        click.echo("error: every type failed", err=True)
        raise SystemExit(1)
