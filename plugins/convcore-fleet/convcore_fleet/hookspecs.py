"""The hook the fleet plugin adds to convcore's (through ``convcore_add_hookspecs``)."""
from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("convcore")


class FleetSpecs:
    @hookspec
    def convcore_register_executors(self, register: Callable[..., None], fleet: Any) -> None:
        """Register the batch executors this plugin provides (``convcore batch --executor``).

        Call ``register(executor)`` with instances of ``fleet.Executor``; each runs a batch's
        jobs somewhere (this machine's processes, a Ray cluster, ...) and yields their
        results. A name registered twice is an error naming both plugins. Implement it with
        ``@convcore.hookimpl(optionalhook=True)`` so your plugin still loads where the fleet
        plugin is not installed.

        :param register: call it once per executor.
        :param fleet: the ``convcore_fleet`` package (``Executor``, ``Job``,
            ``run_isolated``), so an executor plugin needs no import of it.
        :return: nothing.
        """
