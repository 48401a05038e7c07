"""The ``convcore serve`` command, added to the CLI through ``convcore_register_commands``."""
from __future__ import annotations

from pathlib import Path

import click
from convcore.options import parse_size


@click.command()
@click.argument("models", nargs=-1, required=True, metavar="[REGISTRY | PATH...]",
                type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on (0: any free port, printed at startup).")
@click.option("--max-loaded", type=click.IntRange(min=1), default=2, show_default=True,
              help="Models open at once; the least recently used is closed to load another.")
@click.option("--ctx", type=click.IntRange(min=1),
              help="Context of each model in tokens (default: the model's, at most 4096).")
@click.option("--threads", type=click.IntRange(min=1), help="Threads for each runtime (default: its own).")
@click.option("--api-key", envvar="CONVCORE_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every route but /health [env CONVCORE_API_KEY].")
@click.option("--max-body", default="32M", show_default=True,
              help="Largest request body accepted (e.g. 1M); larger ones get 413 unparsed.")
@click.option("--lora", "loras", multiple=True, metavar="ADAPTER[:SCALE]",
              help="Apply a LoRA adapter to every served model in its runtime (as infer --lora).")
def serve(models: tuple[Path, ...], host: str, port: int, max_loaded: int, ctx: int | None,
          threads: int | None, api_key: str | None = None, max_body: str = "32M",
          loras: tuple[str, ...] = ()) -> None:
    """Serve models over an OpenAI-compatible HTTP API (/v1/models, /v1/completions,
    /v1/chat/completions, /v1/embeddings). Give model paths of any format convcore runs,
    served as their file or directory names, or one model_registry.json."""
    from convcore.cli import Terminated

    from . import models_from_args
    from . import serve as run_server

    served = models_from_args(models)
    if loras:
        import dataclasses

        from convcore.lora import parse_lora

        adapters = tuple(parse_lora(spec) for spec in loras)
        served = [dataclasses.replace(m, lora=adapters) for m in served]
    try:
        run_server(served, host=host, port=port, max_loaded=max_loaded, ctx=ctx, threads=threads,
                   api_key=api_key or None, max_body=parse_size(max_body))
    except (KeyboardInterrupt, Terminated):
        click.echo("stopped", err=True)  # a signal is how a server ends; not an error
