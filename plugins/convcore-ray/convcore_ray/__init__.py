"""convcore plugin: the ``ray`` executor for ``convcore batch``.

Each job is a Ray task that runs the fleet's ``run_isolated`` (a fresh Python
process per job, as the ``local`` executor does), declaring the job's threads as
``num_cpus`` and its estimated peak memory as ``memory``, so Ray places jobs where they
fit. Results come back to the driver, which records them in the batch's state,
summary and model registry; outputs are written where the job says (shared storage).

It builds on the convcore-fleet plugin (a declared dependency) without importing it: the
fleet's ``convcore_register_executors`` hook hands its package over as ``fleet``, and the
executor class is made from ``fleet.Executor`` there.
"""
from __future__ import annotations

import os
import socket
from typing import Any, Iterator, Sequence

from convcore import ConvcoreError, Option, hookimpl

CANCEL_GRACE_S = 20.0


class RayExecutor:
    """Jobs as Ray tasks on the cluster at ``address`` (default ``RAY_ADDRESS``, else a
    Ray started on this machine for the batch and stopped after it)."""

    name = "ray"
    description = "a Ray task per job, on a local or remote Ray cluster"
    options = (
        Option("address", "str", None, "the cluster: auto, HOST:6379 or ray://HOST:10001 "
               "(default: RAY_ADDRESS, else start Ray here for this batch)"),
        Option("num_cpus", "int", None, "CPUs of a Ray started here (default: all)"),
        Option("logs", "str", None, "keep each job's log in this folder (on the node that ran it)"),
    )

    def __init__(self, run_isolated: Any):
        self.run_isolated = run_isolated

    def run(self, jobs: Sequence[Any], parallel: int | None, options: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if not jobs:
            return
        import ray

        started_here = False
        if not ray.is_initialized():
            address = options.get("address") or os.environ.get("RAY_ADDRESS") or None
            kwargs: dict[str, Any] = {"address": address, "log_to_driver": False}
            if address is None:
                kwargs["include_dashboard"] = False
                if options.get("num_cpus"):
                    kwargs["num_cpus"] = options["num_cpus"]
            _reachable(address)
            try:
                ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                first = (str(exc).strip().splitlines() or [""])[0]
                raise ConvcoreError(f"ray: cannot reach the cluster at {address}: {first}") from None
            started_here = True
        task = ray.remote(max_retries=0)(self.run_isolated)
        cpus, memory = _largest_node()
        pending = list(jobs)
        running: dict[Any, Any] = {}
        limit = parallel or len(jobs)
        try:
            while pending or running:
                while pending and len(running) < limit:
                    job = pending.pop(0)
                    opts: dict[str, Any] = {"num_cpus": min(job.threads, cpus) if cpus else job.threads,
                                            "name": f"convcore:{job.id}"}
                    if job.memory_mb:
                        want = job.memory_mb * 2**20
                        # never more than a node has, or the task would wait forever
                        opts["memory"] = min(want, int(memory * 0.9)) if memory else want
                    running[task.options(**opts).remote(job.to_dict(), options.get("logs"))] = job
                ready, _ = ray.wait(list(running), num_returns=1)
                for ref in ready:
                    job = running.pop(ref)
                    try:
                        yield ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        first = (str(exc).strip().splitlines() or [""])[0]
                        yield {"id": job.id, "status": "failed",
                               "error": f"ray: {type(exc).__name__}: {first}"}
        finally:
            if running:
                _cancel(ray, list(running))
            if started_here:
                ray.shutdown()


def _reachable(address: str | None, timeout: float = 5.0) -> None:
    """A ``HOST:PORT`` address that refuses connections is a one-line error now, not
    minutes of Ray's reconnect attempts."""
    if not address or address in ("auto", "local") or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as exc:
        raise ConvcoreError(f"ray: cannot reach the cluster at {address}: {exc}") from None


def _largest_node() -> tuple[float, float]:
    """CPUs and memory (bytes) of the cluster's largest alive node."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if not nodes:
        return 0.0, 0.0
    return (max(n.get("CPU", 0.0) for n in nodes), max(n.get("memory", 0.0) for n in nodes))


def _cancel(ray: Any, refs: list[Any]) -> None:
    """Interrupt running jobs (each removes its temporary output), then force."""
    for ref in refs:
        ray.cancel(ref)
    _, still = ray.wait(refs, num_returns=len(refs), timeout=CANCEL_GRACE_S)
    for ref in still:
        ray.cancel(ref, force=True)


def executor_class(fleet: Any) -> type:
    """:class:`RayExecutor` as a subclass of the fleet's ``Executor`` (what the fleet's
    registration checks for)."""
    return type("RayExecutor", (RayExecutor, fleet.Executor), {})


@hookimpl(optionalhook=True)
def convcore_register_executors(register: Any, fleet: Any) -> None:
    register(executor_class(fleet)(fleet.run_isolated))
