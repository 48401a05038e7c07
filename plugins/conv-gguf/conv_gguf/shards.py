"""Which files make up a GGUF model: one file, or the shards of a split one.

Its own module because the header checks (checks.py) and the reader (reader.py) both
need it and the reader already imports the checks.
"""
from __future__ import annotations

import glob
import re
from pathlib import Path

from convcore import ConvcoreError, inside_model

# llama.cpp's split naming: {stem}-00001-of-0000N.gguf
SHARD = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<n>\d{5})\.gguf$")


def shard_paths(path: Path) -> list[Path]:
    """``path`` alone, or every shard of a split GGUF when ``path`` is one of them."""
    path = Path(path)
    if not path.exists():
        # a split written for ``model.gguf`` is ``model-00001-of-0000N.gguf`` and siblings
        firsts = sorted(path.parent.glob(f"{glob.escape(path.stem)}-00001-of-?????.gguf"))
        if firsts:
            path = firsts[0]
    m = SHARD.match(path.name)
    if not m:
        return [path]
    n = int(m.group("n"))
    paths = [path.with_name(f"{m.group('stem')}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ConvcoreError(f"{path}: split GGUF is missing shard {missing[0]}")
    return [inside_model(p, path.parent) for p in paths]
