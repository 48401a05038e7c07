"""``convcore imatrix``, added to the CLI through ``convcore_register_commands``."""
from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import click


@click.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--text", "text_file", required=True, type=click.Path(path_type=Path),
              help="Calibration text (UTF-8), e.g. a few hundred KB of the model's domain.")
@click.option("-o", "--output", "dst", required=True, type=click.Path(path_type=Path),
              help="The importance matrix to write (llama.cpp's GGUF imatrix format).")
@click.option("--ctx", type=click.IntRange(min=2), default=512, show_default=True,
              help="Tokens per chunk.")
@click.option("--chunks", type=click.IntRange(min=1), help="Use at most this many chunks.")
@click.option("--process-output", is_flag=True,
              help="Also measure the output layer (llama-imatrix's --process-output).")
@click.option("--from", "from_", metavar="FMT", help="Source format (detected when omitted).")
@click.option("--threads", type=int, help="Threads for the runtime (default: its own).")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def imatrix(src: Path, text_file: Path, dst: Path, ctx: int, chunks: int | None,
            process_output: bool, from_: str | None, threads: int | None, force: bool,
            quiet: bool) -> None:
    """Compute the importance matrix of SRC on a text, as llama.cpp's llama-imatrix does:
    per matrix of the layers, each input column's sum of squared activations over the
    text's ctx-token chunks (first token BOS, the partial last chunk dropped), per expert
    for stacked experts. Pass the file to `convcore run --imatrix` (or llama-quantize)."""
    from convcore import ConvcoreError

    from .imatrix import write_imatrix
    from .imatrix_run import compute

    import convcore

    src = convcore.resolve_model(src)   # a hub id: its local snapshot
    if not src.exists():
        raise ConvcoreError(f"{src}: no such file or directory")
    if dst.exists() and not force:
        raise ConvcoreError(f"{dst}: already exists; pass --force to overwrite")
    if dst.is_dir():
        raise ConvcoreError(f"{dst}: is a directory")
    result = compute(src, text_file, ctx=ctx, n_chunks=chunks, process_output=process_output,
                     from_=from_, threads=threads, progress=not quiet)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = dst.parent / f".{dst.name}.convcore-{uuid.uuid4().hex[:8]}"
    try:
        write_imatrix(staging, result)
        os.replace(staging, dst)
    finally:
        staging.unlink(missing_ok=True)
    print(f"wrote {dst}: {len(result.sums)} matrices, {result.chunk_count} chunks of {ctx} tokens",
          file=sys.stderr)
