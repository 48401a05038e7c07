"""Built-in ``convcore_infer``: one-shot logits through the format's runtime session.

Format plugins implement ``convcore_open_session``; this implementation opens a session,
computes the logits and closes it, so the one-shot hook needs no code of theirs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..hookspecs import hookimpl


class SessionInfer:
    """Answers ``convcore_infer`` through the sessions of the registry it belongs to."""

    def __init__(self, registry: Any):
        self.registry = registry

    @hookimpl(trylast=True)
    def convcore_infer(self, path: Path, fmt: str, token_ids: list[int]) -> np.ndarray | None:
        session = self.registry.pm.hook.convcore_open_session(
            path=Path(path), fmt=fmt, options={"n_ctx": len(token_ids)})
        if session is None:
            return None
        with session:
            return session.logits(token_ids)


def make_plugin(registry: Any) -> SessionInfer:
    """The plugin object the registry registers for itself."""
    return SessionInfer(registry)
