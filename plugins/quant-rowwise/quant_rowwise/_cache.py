"""Where the compiled kernels are kept: one cache per version of this package's sources,
shared by every virtual environment and checkout on the machine.

Numba's default cache sits in ``__pycache__`` beside each source file, keyed by that
file's contents, so a fresh venv (or a wheel installed anew) compiles everything again,
and a change to a helper in one file leaves kernels cached from another file stale. The
locator registered here puts every kernel of this package under
``$CONVCORE_CACHE/numba/quant_rowwise-<digest>`` (default ``~/.cache/convcore``), the
digest covering all of the package's ``.py`` files: identical sources share one cache
wherever they are installed, and any change starts a new one. Numba still checks its own
version and the CPU before it uses an entry. An explicit ``NUMBA_CACHE_DIR`` takes
precedence (Numba's own locator then applies), and an unwritable cache directory falls back
to Numba's default places.

Importing this module registers the locator; the kernel modules import it before their
first ``@njit(cache=True)``.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from numba.core import caching

_PACKAGE = Path(__file__).resolve().parent


def _digest() -> str:
    h = hashlib.sha256()
    for path in sorted(_PACKAGE.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:20]


DIGEST = _digest()


def cache_dir() -> Path:
    """The directory this package's compiled kernels are cached in."""
    root = Path(os.environ.get("CONVCORE_CACHE") or Path.home() / ".cache" / "convcore")
    return root / "numba" / f"quant_rowwise-{DIGEST}"


class SourcesLocator(caching._CacheLocator):
    """Numba cache locator for this package's kernels (see the module docstring)."""

    def __init__(self, py_func, py_file):
        self._lineno = py_func.__code__.co_firstlineno
        self._path = str(cache_dir())

    def get_cache_path(self) -> str:
        return self._path

    def get_source_stamp(self) -> str:
        return DIGEST

    def get_disambiguator(self) -> str:
        return str(self._lineno)

    @classmethod
    def from_function(cls, py_func, py_file):
        if os.environ.get("NUMBA_CACHE_DIR"):
            return None
        try:
            if Path(py_file).resolve().parent != _PACKAGE:
                return None
            self = cls(py_func, py_file)
            self.ensure_cache_path()
        except OSError:
            return None
        return self


# Numba names the class that holds the locator list CacheImpl (0.68) or _CacheImpl
# (earlier); on a Numba with neither, the kernels simply use its default places.
_impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
_classes = getattr(_impl, "_locator_classes", None)
if isinstance(_classes, list) and SourcesLocator not in _classes:
    _classes.insert(0, SourcesLocator)
