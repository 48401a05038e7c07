"""One batch job, run in a process of its own: ``python -m convcore_fleet.worker JOB RESULT``.

The job (a :class:`~convcore_fleet.jobs.Job` as JSON) is converted through
:func:`convcore.convert` (a temporary name beside DST, validated, renamed into place at
the end), hashed, optionally checked against its source, and the result is written as
JSON to RESULT. A crash, a kill or an out-of-memory in one job takes only its own
process with it; the batch records the error and goes on.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from convcore.model import one_line
from .jobs import Job

CHUNK = 1 << 20


class Terminated(Exception):
    """SIGTERM: unwinds through the pipeline, which removes its temporary output."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def output_files(dst: Path, written: Path, directory: bool) -> list[Path]:
    """Every file a job wrote: the whole directory for directory formats; for file
    formats the file, or all its split parts (``NAME-00001-of-00003.gguf``)."""
    if directory:
        return sorted(p for p in dst.rglob("*") if p.is_file())
    parts = sorted(p for p in written.parent.glob(f"{dst.stem}-*-of-*{dst.suffix}") if p.is_file())
    return parts or [written]


def output_digest(files: list[Path], root: Path) -> str:
    """sha256 of a single file; for several files the sha256 of their ``sha256sum``
    listing (``<hex>  <path relative to root>`` lines, sorted by path)."""
    if len(files) == 1:
        return file_sha256(files[0])
    named = sorted((p.relative_to(root).as_posix(), p) for p in files)
    listing = "".join(f"{file_sha256(p)}  {name}\n" for name, p in named)
    return hashlib.sha256(listing.encode()).hexdigest()


def peak_rss_mb() -> float:
    """This process's peak resident memory, MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def model_info(registry: Any, source: Path, fmt: str | None) -> dict[str, Any]:
    """What the registry records about a model: architecture, parameters, context."""
    model = registry.load(source, fmt)
    cfg = model.config
    context = cfg.get("max_position_embeddings") or cfg.get("n_positions")
    return {"architecture": model.arch, "parameters": int(model.num_params),
            "context_length": int(context) if context else None,
            "license": model.metadata.get("license") if isinstance(model.metadata.get("license"), str) else None}


def run_job(job: Job) -> dict[str, Any]:
    """Convert, hash and check one job in this process; never raises (the error is in
    the result's ``error``)."""
    from convcore import fidelity
    from convcore.pipeline import convert
    from convcore.registry import get_registry

    result: dict[str, Any] = {"id": job.id, "status": "failed", "error": None, "path": None,
                              "size_bytes": None, "sha256": None, "files": [], "check": None,
                              "model_info": None, "host": socket.gethostname(),
                              "started_at": time.time()}
    start = time.perf_counter()
    try:
        registry = get_registry()
        dst = Path(job.dst)
        fmt = registry.format(job.to)
        result["model_info"] = model_info(registry, Path(job.source), job.from_)
        written = Path(convert(job.source, dst, job.to, from_=job.from_, quant=job.quant,
                               dtype=job.dtype, metadata=job.metadata, jobs=job.threads,
                               force=job.force, validate=True, options=job.options,
                               registry=registry))
        result["seconds_convert"] = round(time.perf_counter() - start, 3)
        files = output_files(dst, written, fmt.directory)
        root = dst if fmt.directory else dst.parent
        result.update(path=str(dst if fmt.directory else written),
                      files=[p.relative_to(root).as_posix() for p in files],
                      size_bytes=sum(p.stat().st_size for p in files),
                      sha256=output_digest(files, root), status="ok")
        if job.check:
            report, tolerance, broken = fidelity.check_output(
                registry, Path(job.source), written, job.from_, job.to, job.quant, job.dtype,
                kl=job.check.get("kl"), top1=job.check.get("top1"), tokens=job.check["tokens"])
            figures = {k: v for k, v in report.as_dict().items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            result["check"] = {**figures, "tolerance": tolerance, "passed": not broken}
            if broken:
                result.update(status="check-failed",
                              error=f"{written} is beyond tolerance: {'; '.join(broken)}")
    except BaseException as exc:  # noqa: BLE001 - the batch records it; SIGINT/TERM too
        result.update(status="failed", error=one_line(exc) if not isinstance(exc, (KeyboardInterrupt, Terminated))
                      else "interrupted")
        if isinstance(exc, (KeyboardInterrupt, Terminated)):
            result["interrupted"] = True
    result["seconds"] = round(time.perf_counter() - start, 3)
    result["finished_at"] = time.time()
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m convcore_fleet.worker JOB.json RESULT.json", file=sys.stderr)
        return 2

    def on_sigterm(signum: int, frame: Any) -> None:
        raise Terminated

    signal.signal(signal.SIGTERM, on_sigterm)
    job = Job.from_dict(json.loads(Path(args[0]).read_text()))
    result = run_job(job)
    tmp = Path(args[1] + ".tmp")
    tmp.write_text(json.dumps(result, default=str))
    os.replace(tmp, args[1])
    return 130 if result.get("interrupted") else 0


if __name__ == "__main__":
    raise SystemExit(main())
