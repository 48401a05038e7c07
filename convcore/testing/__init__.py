"""Test kit for convcore and its plugins: tiny real models and shared fixtures.

Installed as a pytest plugin (entry point ``pytest11``), so every test suite that has
convcore installed gets the fixtures ``tiny_model_factory`` and ``tiny_llama``.
"""
from .models import ARCHS, make_tiny_encoder, make_tiny_model, tiny_encoder, tiny_model

__all__ = ["ARCHS", "make_tiny_encoder", "make_tiny_model", "tiny_encoder", "tiny_model", "tree_digest"]


def tree_digest(path) -> str:
    """Hash of every file's relative name, size, mtime and bytes under ``path``: equal
    before and after a command means the command left ``path`` untouched."""
    import hashlib
    from pathlib import Path

    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
            h.update(p.read_bytes())
    return h.hexdigest()
