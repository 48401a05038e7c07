"""``convcore batch JOBS.toml``: plan, resume, dispatch to an executor, record, report.

State lives in the output folder: ``.convcore-batch.json`` (each job's fingerprint,
status and result, written atomically after every job), ``batch-summary.json`` and the
model registry. A job is skipped when its last run finished, its fingerprint (source
files and settings) is unchanged and its files are still there and valid. Outputs
appear only when complete (the pipeline writes a temporary name and renames), so a
killed batch leaves nothing half-written that could count as done.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from convcore.model import ConvcoreError, one_line
from convcore.options import check_options
from . import registry as model_registry
from .executors import executor as find_executor
from .jobs import Job, Plan, read_plan

STATE_FILE = ".convcore-batch.json"
LOCK_FILE = ".convcore-batch.lock"
SUMMARY_FILE = "batch-summary.json"
#: a job's memory: the interpreter and libraries, plus a few of its largest tensor in f32
BASE_MEMORY_MB = 400
CHECK_KEYS = ("passed", "kl_mean", "top1_agreement", "ppl_ref", "ppl_cand", "delta_ppl_pct",
              "tokens", "tolerance")


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """One batch at a time per output folder."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConvcoreError(f"{out}: another batch is running on this folder") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_state(out: Path) -> dict[str, Any]:
    path = out / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"jobs": {}}
    except (OSError, json.JSONDecodeError) as exc:
        raise ConvcoreError(f"{path}: the batch state is unreadable ({type(exc).__name__}); "
                            "remove it to start over") from None
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), dict):
        raise ConvcoreError(f"{path}: the batch state is not what convcore writes; remove it to start over")
    return data


def estimate_memory_mb(model: Any, job: Job) -> int:
    """A job's peak memory, roughly: the interpreter and libraries, three copies of the
    largest tensor in float32 per thread, and for ``check`` both models in float32."""
    largest = max((r.numel for r in model.tensors.values()), default=0)
    mb = BASE_MEMORY_MB + 3 * largest * 4 * max(1, job.threads) / 2**20
    if job.check:
        mb += 2 * model.num_params * 4 / 2**20
    return int(math.ceil(mb))


def _intact(job: Job, entry: dict[str, Any], registry: Any) -> bool:
    """The recorded output is still there: same files, same sizes, and valid."""
    result = entry.get("result") or {}
    dst = Path(job.dst)
    if not dst.exists() or not result.get("files"):
        return False
    root = dst if dst.is_dir() else dst.parent
    size = 0
    for name in result["files"]:
        p = root / name
        if not p.is_file():
            return False
        size += p.stat().st_size
    if size != result.get("size_bytes"):
        return False
    try:
        return not registry.validate(Path(result["path"]), job.to)
    except ConvcoreError:
        return False


def _remove_stale_staging(dst: Path) -> None:
    """Temporary outputs a killed run of this job left beside DST (the pipeline's
    ``.NAME.convcore-XXXXXXXX`` names); they never count as output, and go."""
    for p in dst.parent.glob(f".{dst.name}.convcore-*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def variant_of(job: Job, result: dict[str, Any], registry_path: Path) -> dict[str, Any]:
    """The registry's record of a finished job's output."""
    path = Path(result["path"])
    root = path if path.is_dir() else path.parent
    variant: dict[str, Any] = {
        "id": f"{job.to}-{job.label}", "format": job.to,
        "file": model_registry.relative(path, registry_path),
        "files": [model_registry.relative(root / f, registry_path) for f in result["files"]],
        "size_mb": round(result["size_bytes"] / 1e6, 3), "quant": job.quant, "dtype": job.dtype,
        "sha256": result["sha256"], "check": None, "created": model_registry.now(), "job": job.id,
        "seconds": result.get("seconds", 0.0),
    }
    check = result.get("check")
    if check:
        variant["check"] = {k: check[k] for k in CHECK_KEYS if k in check and check[k] is not None
                            and not (isinstance(check[k], float) and not math.isfinite(check[k]))}
    return variant


class Batch:
    """One run of a jobs file."""

    def __init__(self, plan_path: Path, executor: str = "local", parallel: int | None = None,
                 executor_options: dict[str, Any] | None = None, force: bool = False,
                 progress: bool = True, registry: Any = None):
        from convcore.registry import get_registry

        self.registry = registry or get_registry()
        self.plan: Plan = read_plan(Path(plan_path), self.registry)
        self.executor = find_executor(self.registry, executor)
        self.options = check_options(executor, self.executor.options, dict(executor_options or {}),
                                     what="executor")
        self.parallel = parallel or self.plan.parallel
        if self.executor.name == "local" and self.plan.memory and "memory" not in (executor_options or {}):
            self.options["memory"] = self.plan.memory
        self.force = force
        self.progress = progress
        self.rows: dict[str, dict[str, Any]] = {}

    # planning -----------------------------------------------------------------------
    def _prepare(self, state: dict[str, Any]) -> list[Job]:
        """Decide each job: skip (done), fail now (cannot start), or run."""
        to_run = []
        loaded: dict[str, Any] = {}
        for job in self.plan.jobs:
            spec = self.plan.models[job.model]
            if job.model not in loaded:
                try:
                    loaded[job.model] = self.registry.load(spec.source, spec.from_)
                except ConvcoreError as exc:
                    loaded[job.model] = exc
            model = loaded[job.model]
            if isinstance(model, ConvcoreError):
                self._finish(job, {"id": job.id, "status": "failed", "error": one_line(model)}, state)
                continue
            job.memory_mb = estimate_memory_mb(model, job)
            entry = state["jobs"].get(job.id)
            fingerprint = job.fingerprint()
            if entry and entry.get("status") == "ok" and entry.get("fingerprint") == fingerprint \
                    and _intact(job, entry, self.registry) and not self.force:
                self.rows[job.id] = self._row(job, {**entry["result"], "status": "skipped"})
                continue
            dst = Path(job.dst)
            if dst.exists() or dst.is_symlink():
                if not (entry or {}).get("owned") and not self.force:
                    self._finish(job, {"id": job.id, "status": "failed",
                                       "error": f"{dst}: already exists and was not written by this "
                                                "batch; remove it or pass --force"}, state)
                    continue
                job.force = True
            if (entry or {}).get("owned"):
                _remove_stale_staging(Path(job.dst))
            to_run.append(job)
        return to_run

    # recording ----------------------------------------------------------------------
    def _row(self, job: Job, result: dict[str, Any]) -> dict[str, Any]:
        check = result.get("check") or None
        return {"id": job.id, "model": job.model, "format": job.to, "quant": job.quant,
                "dtype": job.dtype, "status": result.get("status", "failed"),
                "error": result.get("error"), "path": result.get("path"),
                "size_bytes": result.get("size_bytes"), "sha256": result.get("sha256"),
                "seconds": result.get("seconds"), "peak_rss_mb": result.get("peak_rss_mb"),
                "memory_estimate_mb": job.memory_mb, "host": result.get("host"),
                "started_at": result.get("started_at"), "finished_at": result.get("finished_at"),
                "check": {k: check[k] for k in CHECK_KEYS if k in check} if check else None}

    def _finish(self, job: Job, result: dict[str, Any], state: dict[str, Any],
                fingerprint: str | None = None) -> None:
        self.rows[job.id] = self._row(job, result)
        # owned: this batch started writing DST, so a later run may replace it
        owned = bool((state["jobs"].get(job.id) or {}).get("owned"))
        state["jobs"][job.id] = {"status": result.get("status"), "fingerprint": fingerprint,
                                 "owned": owned, "dst": job.dst, "result": result}

    def _register(self, job: Job, result: dict[str, Any]) -> None:
        path = self.plan.registry
        data = model_registry.read(path, missing_ok=True)
        spec = self.plan.models[job.model]
        info = dict(result.get("model_info") or {})
        if spec.info.get("license"):
            info["license"] = spec.info["license"]
        if spec.info.get("source_url"):
            info["source_url"] = spec.info["source_url"]
        model = {"id": job.model, "name": spec.info.get("name") or job.model,
                 "source": spec.info.get("source_url") or spec.info["source"],
                 "description": spec.info.get("description"), "metadata": info}
        model_registry.upsert(data, model, variant_of(job, result, path))
        model_registry.write(path, data)

    # running ------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        out = self.plan.out
        with _locked(out):
            state = read_state(out)
            started = time.time()
            to_run = self._prepare(state)
            fingerprints = {job.id: job.fingerprint() for job in to_run}
            for job in to_run:  # recorded before it starts: its DST is ours from here on
                state["jobs"][job.id] = {"status": "running", "fingerprint": fingerprints[job.id],
                                         "owned": True, "dst": job.dst, "result": None}
            _atomic_json(out / STATE_FILE, state)
            by_id = {job.id: job for job in to_run}
            bar = self._bar(len(to_run))
            try:
                for result in self._results(to_run):
                    job = by_id[result["id"]]
                    self._finish(job, result, state, fingerprints[job.id])
                    if result.get("status") == "ok":
                        try:
                            self._register(job, result)
                        except ConvcoreError as exc:
                            self._finish(job, {**result, "status": "failed",
                                               "error": f"registry: {one_line(exc)}"}, state, None)
                    _atomic_json(out / STATE_FILE, state)
                    self._report(bar, self.rows[job.id])
            finally:
                bar.close()
            summary = self.summary(time.time() - started)
            _atomic_json(out / SUMMARY_FILE, summary)
            return summary

    def _results(self, jobs: list[Job]) -> Iterator[dict[str, Any]]:
        """The executor's results, with this batch's registry current (an executor that
        runs jobs in this process converts through the same plugins)."""
        from convcore.registry import using

        with using(self.registry):
            yield from self.executor.run(jobs, self.parallel, self.options)

    def _bar(self, total: int) -> Any:
        from tqdm import tqdm

        return tqdm(total=total, desc="batch", unit="job", file=sys.stderr, leave=False,
                    disable=None if self.progress else True)

    def _report(self, bar: Any, row: dict[str, Any]) -> None:
        bar.update(1)
        if not self.progress:
            return
        size = f"{row['size_bytes'] / 1e6:.1f} MB" if row.get("size_bytes") else "-"
        line = f"{row['status']:<12} {row['id']}  {size}  {row.get('seconds') or 0:.1f} s"
        if row.get("error"):
            line += f"  {row['error']}"
        bar.write(line, file=sys.stderr)

    def summary(self, seconds: float) -> dict[str, Any]:
        rows = [self.rows[j.id] for j in self.plan.jobs if j.id in self.rows]
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        return {"jobs_file": str(self.plan.path), "out": str(self.plan.out),
                "registry": str(self.plan.registry), "executor": self.executor.name,
                "seconds": round(seconds, 3), "counts": counts,
                "ok": all(r["status"] in ("ok", "skipped") for r in rows), "jobs": rows}


def table(summary: dict[str, Any]) -> str:
    """The summary as a text table."""
    head = ("job", "status", "size", "time", "peak mem", "check")
    lines = [head]
    for r in summary["jobs"]:
        check = r.get("check") or {}
        figures = "-"
        if check:
            figures = f"KL {check.get('kl_mean', float('nan')):.2e} top1 {100 * check.get('top1_agreement', 0):.1f}%"
        lines.append((r["id"], r["status"], f"{r['size_bytes'] / 1e6:.1f} MB" if r.get("size_bytes") else "-",
                      f"{r['seconds']:.1f} s" if r.get("seconds") is not None else "-",
                      f"{r['peak_rss_mb']:.0f} MB" if r.get("peak_rss_mb") else "-", figures))
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    text = "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines)
    failed = [r for r in summary["jobs"] if r.get("error")]
    for r in failed:
        text += f"\n{r['id']}: {r['error']}"
    counts = ", ".join(f"{n} {s}" for s, n in sorted(summary["counts"].items()))
    return text + f"\n{len(summary['jobs'])} jobs in {summary['seconds']:.1f} s: {counts}"
