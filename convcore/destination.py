"""Where an output may go, and what ``--force`` may replace there.

``--force`` means "replace my previous output", never "delete this directory". So an
existing DST is replaced only when it holds nothing but what a writer of the target
format produces (its declared :attr:`Format.outputs` plus the companion files every
HF-style directory carries); anything else is refused with the names that would be lost.
Some paths are refused whatever the flags: the working and home directories (and their
ancestors), a filesystem root, the source, anything inside it or above it.
"""
from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from .model import ConvcoreError

if TYPE_CHECKING:
    from .registry import Format

# What travels beside the weights in an HF-style directory: tokenizer files, model card,
# generation config, licence, sentence-transformers modules and their numbered folders.
COMPANION_OUTPUTS: tuple[str, ...] = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "generation_config.json", "README*", "LICENSE*", "LICENCE*", "NOTICE*", "Notice*",
    "USE_POLICY*", "CITATION*", ".gitattributes",
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
    "data_config.json", "[0-9]_*/", "[0-9][0-9]_*/",
)


def _matches(name: str, is_dir: bool, patterns: Iterable[str]) -> bool:
    for pattern in patterns:
        if pattern.endswith("/"):
            if is_dir and fnmatch.fnmatchcase(name, pattern[:-1]):
                return True
        elif not is_dir and fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def foreign_entries(path: Path, outputs: Iterable[str], companions: bool = True) -> list[str]:
    """Entries of directory ``path`` that no writer with these ``outputs`` produces
    (directories end in ``/``), sorted; empty when ``--force`` may replace ``path``.
    ``companions``: HF-style companion files count as produced too."""
    patterns = tuple(outputs) + (COMPANION_OUTPUTS if companions else ())
    foreign = []
    for entry in sorted(path.iterdir(), key=lambda p: p.name):
        is_dir = entry.is_dir() and not entry.is_symlink()
        if not _matches(entry.name, is_dir, patterns):
            foreign.append(entry.name + ("/" if is_dir else ""))
    return foreign


def _contains(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def check_location(dst: Path, src: Path) -> None:
    """Refuse destinations no conversion may replace, ``--force`` or not."""
    spellings = {Path(os.path.abspath(dst)), dst.resolve()}
    source = src.resolve()
    cwd = Path.cwd().resolve()
    home = Path(os.environ["HOME"]).resolve() if os.environ.get("HOME") else None
    for d in spellings:
        if d.parent == d:
            raise ConvcoreError(f"{dst}: is a filesystem root; choose another output path")
        if _contains(d, cwd):
            what = "the working directory" if d == cwd else "an ancestor of the working directory"
            raise ConvcoreError(f"{dst}: is {what}; choose another output path")
        if home is not None and _contains(d, home):
            what = "the home directory" if d == home else "an ancestor of the home directory"
            raise ConvcoreError(f"{dst}: is {what}; choose another output path")
        if _contains(d, source):
            what = "the source" if d == source else "an ancestor of the source"
            raise ConvcoreError(f"{dst}: is {what}; choose another output path")
        if _contains(source, d):
            raise ConvcoreError(f"{dst}: is inside the source {src}; choose another output path")


def check_replaceable(path: Path, fmt: "Format") -> None:
    """Raise unless ``--force`` may replace the existing ``path`` with a ``fmt`` output.

    A symlink is replaced as a link (what it points to is left alone). A file format
    replaces a regular file only; a directory format replaces a directory whose every
    entry is something a writer of ``fmt`` produces.
    """
    if path.is_symlink():
        return
    if fmt.directory:
        if not path.is_dir():
            raise ConvcoreError(f"{path}: exists and is not a directory; a {fmt.name} output is a "
                                "directory, so choose another path")
        foreign = foreign_entries(path, fmt.outputs)
        if foreign:
            shown = ", ".join(foreign[:8]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 8 else "")
            raise ConvcoreError(f"{path}: holds files convcore did not write ({shown}); "
                                "choose another path")
    elif path.is_dir():
        foreign = foreign_entries(path, fmt.outputs, companions=False) if fmt.outputs else []
        if fmt.outputs and len(foreign) < len(list(path.iterdir())):
            if not foreign:
                return  # a file format's split output, written as a directory of parts
            raise ConvcoreError(f"{path}: holds files convcore did not write "
                                f"({', '.join(foreign[:8])}); choose another path")
        ext = fmt.extensions[0] if fmt.extensions else f".{fmt.name}"
        raise ConvcoreError(f"{path}: is a directory; a {fmt.name} output is a file, so give a "
                            f"file path such as {path / ('model' + ext)}")
    elif not path.is_file():
        raise ConvcoreError(f"{path}: exists and is not a regular file; choose another path")


def size_on_disk(path: Path) -> int:
    """Bytes of the file, or of every file under the directory (links followed, as a
    hub cache snapshot's files are links into its blobs)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
