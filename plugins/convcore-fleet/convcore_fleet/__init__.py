"""convcore plugin ``fleet``: many conversions from one jobs file (``convcore batch``),
run by an executor plugin on this machine or a cluster, and the model registry they are
recorded in (``convcore registry``). It adds its commands through
``convcore_register_commands`` and the ``convcore_register_executors`` hook through
``convcore_add_hookspecs`` (:mod:`.hookspecs`); its own ``local`` executor is registered
with it.

- :mod:`.jobs` reads ``JOBS.toml`` into :class:`Job` s (models x targets x types);
- :mod:`.worker` runs one job in a process of its own (convert, validate, check, hash);
- :mod:`.executors` defines :class:`Executor` and the built-in ``local`` one;
- :mod:`.batch` plans, resumes, dispatches and reports;
- :mod:`.registry` reads, validates and updates ``model_registry.json``.
"""
from typing import Any

import convcore

__all__ = ["Executor", "Job", "run_isolated"]


@convcore.hookimpl
def convcore_add_hookspecs(pluginmanager: Any) -> None:
    from .hookspecs import FleetSpecs
    pluginmanager.add_hookspecs(FleetSpecs)


@convcore.hookimpl
def convcore_register_commands(cli: Any) -> None:
    from .commands import register
    register(cli)


@convcore.hookimpl(optionalhook=True)
def convcore_register_executors(register: Any) -> None:
    from .executors import LocalExecutor
    register(LocalExecutor())


def __getattr__(name: str) -> Any:
    # imported on first use: the CLI loads this package for its commands at every start
    if name in ("Executor", "run_isolated"):
        from . import executors
        return getattr(executors, name)
    if name == "Job":
        from .jobs import Job
        return Job
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
