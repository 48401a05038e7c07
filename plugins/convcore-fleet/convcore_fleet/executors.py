"""Executors: where a batch's jobs run. They are plugins.

A plugin implements ``convcore_register_executors(register, fleet)`` (a hook this
package adds) and passes
:class:`Executor` objects; ``convcore batch --executor NAME`` picks one. Every executor
runs each job through :func:`run_isolated` (a fresh Python process per job), so a job's
output and figures do not depend on where it ran. The built-in ``local`` executor runs
jobs on this machine, bounded by cores and by memory; cluster executors (Ray's, for
one) ship as distributions of their own.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Iterator, Sequence

from convcore.model import ConvcoreError
from convcore.options import Option, parse_size
from .jobs import Job

LOG_TAIL = 4000
_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()


class Executor:
    """Runs a batch's jobs. Subclass it, set :attr:`name`, implement :meth:`run` and
    register an instance from ``convcore_register_executors``.

    :attr options: the :class:`convcore.Option` s it accepts as ``-X KEY=VALUE``.
    """

    name: str = ""
    description: str = ""
    options: tuple[Option, ...] = ()

    def run(self, jobs: Sequence[Job], parallel: int | None, options: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Run every job and yield each one's result (what :func:`run_isolated` returns)
        as it finishes, in any order. ``parallel`` is the user's ``--jobs`` (None: the
        executor decides); each :class:`Job` says its threads and estimated memory."""
        raise NotImplementedError


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        hint = " (out of memory?)" if -rc == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with status {rc}"


def _log_tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_TAIL))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def run_isolated(job: dict[str, Any], log_dir: str | None = None) -> dict[str, Any]:
    """Run one job (a :meth:`Job.to_dict`) in a new Python process and return its result.
    Its output (warnings, a runtime's log) goes to ``log_dir/<job>.log`` when given. If the
    process dies without a result (crash, kill, out of memory) the result says how."""
    with tempfile.TemporaryDirectory(prefix="convcore-job-") as tmp:
        job_file, result_file, log = Path(tmp, "job.json"), Path(tmp, "result.json"), Path(tmp, "job.log")
        job_file.write_text(json.dumps(job))
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "convcore_fleet.worker", str(job_file),
                                     str(result_file)], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env)
            with _LIVE_LOCK:
                _LIVE.add(proc)
            try:
                rc = proc.wait()
            finally:
                with _LIVE_LOCK:
                    _LIVE.discard(proc)
                if proc.poll() is None:  # we are being torn down: take the job with us
                    _stop(proc)
        if log_dir:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log, Path(log_dir) / (job["id"].replace("/", "__") + ".log"))
        if result_file.exists():
            return json.loads(result_file.read_text())
        tail = _log_tail(log)
        return {"id": job["id"], "status": "failed", "interrupted": rc in (-signal.SIGINT, -signal.SIGTERM, 130),
                "error": f"the job's process {_describe_exit(rc)}" + (f": {tail}" if tail else "")}


def _stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM (the job removes its temporary output), then SIGKILL after ``grace``."""
    try:
        proc.terminate()
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except OSError:
        pass


def stop_all() -> None:
    """Stop every job process this process started (the batch is being interrupted)."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for proc in live:
        if proc.poll() is None:
            _stop(proc)


def available_memory_mb() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else the free physical pages; None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**20
    except (ValueError, OSError, AttributeError):
        return None


class LocalExecutor(Executor):
    """Jobs as processes on this machine: at most ``--jobs`` at once (default: the cores
    divided by each job's threads), and only as many as fit in memory (``-X memory=``,
    default 80% of the memory available when the batch starts) by their estimates. A job
    larger than the whole budget still runs, alone."""

    name = "local"
    description = "a process per job on this machine, bounded by cores and memory"
    options = (
        Option("memory", "size", None, "memory the running jobs may use together "
               "(default: 80% of what is available at the start)"),
        Option("logs", "str", None, "keep each job's log in this folder"),
    )

    def run(self, jobs: Sequence[Job], parallel: int | None, options: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if not jobs:
            return
        threads = max(1, min(j.threads for j in jobs))
        workers = parallel or max(1, (os.cpu_count() or 1) // threads)
        if options.get("memory"):
            budget_mb = parse_size(options["memory"]) // 2**20
        else:
            avail = available_memory_mb()
            budget_mb = int(avail * 0.8) if avail else 1 << 40
        pending = deque(jobs)
        running: dict[Future, Job] = {}
        used = 0
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="convcore-job")
        try:
            while pending or running:
                for job in list(pending):
                    if len(running) >= workers:
                        break
                    if running and used + job.memory_mb > budget_mb:
                        continue
                    pending.remove(job)
                    used += job.memory_mb
                    running[pool.submit(run_isolated, job.to_dict(), options.get("logs"))] = job
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in done:
                    job = running.pop(fut)
                    used -= job.memory_mb
                    yield fut.result()
        finally:
            if running:
                stop_all()
            pool.shutdown(wait=True, cancel_futures=True)


def executors(registry: Any) -> dict[str, Executor]:
    """Every executor the installed plugins register, by name."""
    from convcore.extensions import collect_registrations

    import convcore_fleet
    return collect_registrations("convcore_register_executors", key=lambda e: e.name,
                                 what="executor", kind=Executor, registry=registry,
                                 extra={"fleet": convcore_fleet}).items


def executor(registry: Any, name: str) -> Executor:
    table = executors(registry)
    if name not in table:
        raise ConvcoreError(f"no executor named {name!r} (is the plugin that provides it installed?); "
                            f"installed: {', '.join(sorted(table))}")
    return table[name]
