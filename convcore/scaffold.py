"""``convcore new-plugin NAME``: write a plugin distribution to start from.

The files are templates shipped in ``templates/plugin/`` with ``{{name}}`` standing for
the format name. What comes out is a working, installable format (a directory of ``.npy``
files with a JSON index, one declared option) and tests that run the conformance suite,
so an author starts from green tests and changes the layout into theirs.
"""
from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path

from .model import ConvcoreError

TEMPLATES = Path(__file__).parent / "templates" / "plugin"
# template -> where it goes in the distribution
FILES = {
    "pyproject.toml.tmpl": "pyproject.toml",
    "README.md.tmpl": "README.md",
    "plugin.py.tmpl": "convcore_{name}/__init__.py",
    "test_plugin.py.tmpl": "tests/test_{name}.py",
}
# The name is the format name, the entry point name and part of the module name
# (convcore_NAME), so it must be all three: a lowercase Python identifier.
NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,39}")


def check_name(name: str) -> None:
    """Raise unless ``name`` can be a new plugin's format name."""
    if not NAME_RE.fullmatch(name):
        raise ConvcoreError(f"plugin name {name!r}: expected a lowercase identifier such as myfmt "
                            "(a-z, 0-9 and _, starting with a letter, at most 40 characters)")
    from .registry import get_registry

    try:
        taken = get_registry().formats.get(name)
    except ConvcoreError:  # installed plugins that clash among themselves are not our concern
        taken = None
    if taken is not None:
        raise ConvcoreError(f"plugin name {name!r}: format {name!r} is already registered by "
                            f"plugin {taken.plugin!r}; choose another name")


def render(template: str, name: str) -> str:
    return (TEMPLATES / template).read_text(encoding="utf-8").replace("{{name}}", name)


def create_plugin(name: str, directory: Path | None = None) -> Path:
    """Write the distribution ``convcore-NAME`` into ``directory`` (default
    ``./convcore-NAME``), which must not exist or be empty; returns its path.

    Nothing is left behind on failure: a new directory is written under a temporary name
    beside it and renamed into place; an existing empty one is emptied again.
    """
    check_name(name)
    target = Path(directory) if directory is not None else Path(f"convcore-{name}")
    existed = target.exists() or target.is_symlink()
    if existed:
        if not target.is_dir():
            raise ConvcoreError(f"{target}: exists and is not a directory; choose another --dir")
        if any(target.iterdir()):
            raise ConvcoreError(f"{target}: exists and is not empty; choose another --dir")
    target.parent.mkdir(parents=True, exist_ok=True)
    root = target if existed else target.parent / f".{target.name}.convcore-{uuid.uuid4().hex[:8]}"
    try:
        for template, relative in FILES.items():
            out = root / relative.format(name=name)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(render(template, name), encoding="utf-8")
        if not existed:
            root.rename(target)
    except BaseException:
        if existed:
            for child in list(target.iterdir()):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        else:
            shutil.rmtree(root, ignore_errors=True)
        raise
    return target
