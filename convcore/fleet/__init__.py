"""Fleets: many conversions from one jobs file (``convcore batch``), run by an executor
plugin on this machine or a cluster, and the model registry they are recorded in.

- :mod:`.jobs` reads ``JOBS.toml`` into :class:`Job` s (models x targets x types);
- :mod:`.worker` runs one job in a process of its own (convert, validate, check, hash);
- :mod:`.executors` defines :class:`Executor` and the built-in ``local`` one;
- :mod:`.batch` plans, resumes, dispatches and reports;
- :mod:`.registry` reads, validates and updates ``model_registry.json``.
"""
from typing import Any

__all__ = ["Executor", "Job", "run_isolated"]


def __getattr__(name: str) -> Any:
    # imported on first use: the CLI loads this package for its commands at every start
    if name in ("Executor", "run_isolated"):
        from . import executors
        return getattr(executors, name)
    if name == "Job":
        from .jobs import Job
        return Job
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
