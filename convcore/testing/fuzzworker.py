"""Run ``convcore inspect``, ``validate`` and ``run`` in-process on many fuzzed inputs,
under an address-space limit, and report what each did (tests/test_fuzz_e2e.py).

    python -m convcore.testing.fuzzworker JOB.json

JOB.json: ``{"cases": [{"id": ..., "path": ...}, ...], "runs": [[ARG, ...], ...],
"out": DIR, "results": FILE.jsonl, "headroom": BYTES, "alarm": SECONDS}``. The worker
runs every command on the known-good inputs of ``warmup`` first (imports, compiled
kernels), then limits its
address space (``RLIMIT_AS``) to its virtual size at that point plus ``headroom``, so a
reader that allocates what a header declares instead of what the file holds fails with
``MemoryError`` here instead of going unnoticed. Each case then runs, in this process:
``inspect PATH``, ``validate PATH`` and ``run PATH -o OUT --to ... -q`` for each entry of
``runs`` (an output that was written is validated with ``validate`` as well), each with
stdout and stderr captured and ``signal.alarm`` as a hang guard. One JSON line per case
is appended to ``results`` (and flushed) as soon as the case is done; a ``start`` line
before it names the case, so a crash of the worker itself points at its input.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import signal
import sys
import traceback
from pathlib import Path
from typing import Any


class Hang(BaseException):
    """Raised by the alarm: a command ran past its time (BaseException, so the CLI's own
    ``except Exception`` cannot turn it into an error line)."""


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (0 where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> None:
    """Let VmHWM count from now (Linux: writing 5 to clear_refs resets it)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def run_cli(argv: list[str], alarm: int) -> dict[str, Any]:
    """``convcore ARGV`` in-process: exit code, stderr, and anything that escaped."""
    from convcore import cli

    out, err = io.StringIO(), io.StringIO()
    rec: dict[str, Any] = {"argv": argv, "code": 0, "escaped": None}
    signal.alarm(alarm)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code
        rec["code"] = code if isinstance(code, int) else (0 if code is None else repr(code))
    except Hang:
        rec["code"] = "hang"
        rec["escaped"] = f"Hang: no result after {alarm} s"
    except BaseException as exc:  # noqa: BLE001 - whatever escapes main() is the finding
        rec["code"] = "escaped"
        rec["escaped"] = "".join(traceback.format_exception(exc))[-4000:]
    finally:
        signal.alarm(0)
    rec["stderr"] = err.getvalue()[-4000:]
    return rec


def _on_alarm(signum: int, frame: Any) -> None:
    raise Hang


def run_case(path: str, runs: list[list[str]], out_root: Path, tag: str, alarm: int) -> list[dict[str, Any]]:
    """inspect, validate, and each run (its output validated too) of one input."""
    cmds = [run_cli(["inspect", path], alarm), run_cli(["validate", path], alarm)]
    for i, extra in enumerate(runs):
        dst = out_root / f"{tag}-{i}"
        rec = run_cli(["run", path, "-o", str(dst), *extra, "-q"], alarm)
        cmds.append(rec)
        if rec["code"] == 0:
            rec["output_validate"] = run_cli(["validate", str(dst)], alarm)
        shutil.rmtree(dst, ignore_errors=True)
        with contextlib.suppress(OSError):
            dst.unlink()
    return cmds


def main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    alarm = int(job.get("alarm", 60))
    out_root = Path(job["out"])
    signal.signal(signal.SIGALRM, _on_alarm)
    # every plugin imported and every kernel a good input needs compiled (or loaded from
    # numba's cache) before the limit: a compile is not what the limit is about
    warm = [{"path": path, "cmds": run_case(path, job["runs"], out_root, f"warmup{i}", alarm)}
            for i, path in enumerate(job.get("warmup", []))]
    base_vm = _status("VmSize")
    limit = base_vm + int(job["headroom"])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    with open(job["results"], "a", encoding="utf-8") as results:
        results.write(json.dumps({"worker": True, "base_vm": base_vm, "limit": limit,
                                  "base_rss": _status("VmRSS"), "warmup": warm}) + "\n")
        results.flush()
        for case in job["cases"]:
            path = case["path"]
            results.write(json.dumps({"start": case["id"]}) + "\n")
            results.flush()
            _reset_peak_rss()
            cmds = run_case(path, job["runs"], out_root, case["id"], alarm)
            results.write(json.dumps({"id": case["id"], "cmds": cmds,
                                      "peak_rss": _status("VmHWM"), "vm": _status("VmSize"),
                                      "vm_peak": _status("VmPeak")}) + "\n")
            results.flush()
    os._exit(0)  # skip interpreter teardown (threads of numba/torch) under the limit


if __name__ == "__main__":
    main(sys.argv[1])
