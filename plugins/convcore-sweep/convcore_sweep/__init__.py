"""convcore plugin ``sweep``: ``convcore sweep SRC --to FMT --all`` converts a model to
each quantization type and measures each (size, perplexity and its change, KL against the
source, generation speed) in the format's own runtime, with a size/KL plot and a
recommendation (:mod:`.sweep`; the command, added through ``convcore_register_commands``,
is :mod:`.command`)."""
from __future__ import annotations

from typing import Any

import convcore


@convcore.hookimpl
def convcore_register_commands(cli: Any) -> None:
    from .command import sweep
    cli.add_command(sweep)
