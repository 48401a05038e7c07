"""``JOBS.toml``: a fleet as models x targets x types.

::

    [batch]
    out = "fleet"                   # outputs go under here (relative to this file)
    registry = "model_registry.json"  # relative to out
    jobs = 2                        # jobs at once (--jobs overrides)
    threads = 2                     # threads inside each job

    [[model]]
    id = "tiny-llama"               # the registry's model id; names the output folder
    source = "models/tiny-llama"    # relative to this file, or absolute
    name = "Tiny Llama"             # optional: from, license, source_url as well

    [[target]]
    to = "gguf"
    quant = ["q8_0", "q4_k_m"]      # one job per type; omitted = the source's float type
    models = ["tiny-llama"]         # default: every model
    options = { }                   # the format's -O options
    check = { kl = 0.05, tokens = 512 }   # or true: the type's own tolerance

A target's job writes ``OUT/<model>/<model>-<label>.<ext>`` (file formats) or
``OUT/<model>/<format>-<label>/`` (directory formats); ``<label>`` is the type
(``q4_k_m``), the dtype, or ``native``, unless the target names it (``label = ...``).
"""
from __future__ import annotations

import hashlib
import json
import os
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import convcore
from convcore.model import ConvcoreError

BATCH_KEYS = {"out", "registry", "jobs", "threads", "check", "memory"}
MODEL_KEYS = {"id", "source", "from", "name", "license", "source_url", "description", "imatrix"}
TARGET_KEYS = {"to", "quant", "dtype", "models", "options", "metadata", "check", "label"}
CHECK_KEYS = {"kl", "top1", "tokens"}
DEFAULT_CHECK_TOKENS = 512


@dataclass
class Job:
    """One conversion of a fleet, as plain data (it crosses process and machine
    boundaries as JSON: :meth:`to_dict` / :meth:`from_dict`)."""

    id: str
    model: str
    source: str
    to: str
    dst: str
    from_: str | None = None
    quant: str | None = None
    dtype: str | None = None
    label: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    #: ``{"kl": .., "top1": .., "tokens": ..}`` (limits absent = the type's own), or None
    check: dict[str, Any] | None = None
    threads: int = 1
    #: estimated peak memory of the job, MiB (the local executor and Ray schedule by it)
    memory_mb: int = 0
    #: replace DST (set by the batch for outputs it started itself)
    force: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Job":
        return cls(**data)

    def fingerprint(self) -> str:
        """What decides the output's bytes: the source (names, sizes, times of its files)
        and every setting. A finished job whose fingerprint changed runs again."""
        spec = {k: v for k, v in self.to_dict().items() if k not in ("force", "memory_mb", "threads")}
        spec["source_state"] = source_state(Path(self.source))
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class ModelSpec:
    id: str
    source: Path
    from_: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    # the model's importance matrix, given to the targets whose format takes one (gguf)
    imatrix: Path | None = None


@dataclass
class Plan:
    """A parsed jobs file."""

    path: Path
    out: Path
    registry: Path
    models: dict[str, ModelSpec]
    jobs: list[Job]
    parallel: int | None = None
    memory: str | None = None


def source_state(path: Path) -> list[Any]:
    """Names, sizes and modification times of the source's files (links followed)."""
    try:
        if path.is_file():
            st = path.stat()
            return [[path.name, st.st_size, st.st_mtime_ns]]
        out = []
        for p in sorted(path.rglob("*")):
            if p.is_file():
                st = p.stat()
                out.append([str(p.relative_to(path)), st.st_size, st.st_mtime_ns])
        return out
    except OSError:
        return []


def _table_list(data: dict[str, Any], key: str, where: Path) -> list[dict[str, Any]]:
    value = data.get(key, [])
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConvcoreError(f"{where}: '{key}' must be a list of tables ([[{key}]])")
    return value


def _unknown(table: dict[str, Any], allowed: set[str], what: str, where: Path) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise ConvcoreError(f"{where}: {what}: unknown key {extra[0]!r} "
                            f"(known: {', '.join(sorted(allowed))})")


def _as_list(value: Any, what: str, where: Path) -> list[Any]:
    if value is None:
        return [None]
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise ConvcoreError(f"{where}: {what} must be a string or a non-empty list of strings")


def _check_spec(value: Any, what: str, where: Path) -> dict[str, Any] | None:
    if value is None or value is False:
        return None
    if value is True:
        return {"tokens": DEFAULT_CHECK_TOKENS}
    if not isinstance(value, dict):
        raise ConvcoreError(f"{where}: {what}: check must be true, false or a table "
                            "{ kl = .., top1 = .., tokens = .. }")
    _unknown(value, CHECK_KEYS, f"{what}: check", where)
    spec = {"tokens": DEFAULT_CHECK_TOKENS, **value}
    for key in CHECK_KEYS & set(value):
        if not isinstance(value[key], (int, float)) or isinstance(value[key], bool) or value[key] <= 0:
            raise ConvcoreError(f"{where}: {what}: check.{key} must be a positive number")
    spec["tokens"] = int(spec["tokens"])
    return spec


def _safe_id(value: Any, what: str, where: Path) -> str:
    if not isinstance(value, str) or not value or value in (".", "..") or "/" in value \
            or "\\" in value or value.startswith("."):
        raise ConvcoreError(f"{where}: {what}: id {value!r} must be a plain name "
                            "(no slashes, not starting with a dot)")
    return value


def read_plan(path: Path, registry: Any) -> Plan:
    """Parse and check ``path``; errors in the file itself are one line naming it. A job
    the installed plugins cannot run (format absent) is planned anyway and fails alone."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConvcoreError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConvcoreError(f"{path}: cannot read ({type(exc).__name__})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConvcoreError(f"{path}: not valid TOML: {exc}") from None
    _unknown(data, {"batch", "model", "target"}, "top level", path)
    base = path.resolve().parent
    batch = data.get("batch", {})
    if not isinstance(batch, dict):
        raise ConvcoreError(f"{path}: [batch] must be a table")
    _unknown(batch, BATCH_KEYS, "[batch]", path)
    out = base / str(batch.get("out", path.stem + "-out"))
    registry_file = out / str(batch.get("registry", "model_registry.json"))
    batch_check = _check_spec(batch.get("check"), "[batch]", path)
    threads = batch.get("threads", 1)
    if not isinstance(threads, int) or threads < 1:
        raise ConvcoreError(f"{path}: [batch]: threads must be a positive integer")
    parallel = batch.get("jobs")
    if parallel is not None and (not isinstance(parallel, int) or parallel < 1):
        raise ConvcoreError(f"{path}: [batch]: jobs must be a positive integer")

    models: dict[str, ModelSpec] = {}
    for i, m in enumerate(_table_list(data, "model", path), 1):
        what = f"[[model]] {i}"
        _unknown(m, MODEL_KEYS, what, path)
        mid = _safe_id(m.get("id"), what, path)
        if mid in models:
            raise ConvcoreError(f"{path}: {what}: model id {mid!r} is used twice")
        if not isinstance(m.get("source"), str):
            raise ConvcoreError(f"{path}: {what}: 'source' (a path) is required")
        source = Path(os.path.expanduser(m["source"]))
        source = source if source.is_absolute() else base / source
        if convcore.is_hub_id(m["source"]) and not source.exists():
            source = Path(m["source"])   # a hub id, fetched when its jobs run
        info = {k: m[k] for k in ("name", "license", "source_url", "description") if k in m}
        info["source"] = m["source"]
        imatrix = m.get("imatrix")
        if imatrix is not None:
            if not isinstance(imatrix, str):
                raise ConvcoreError(f"{path}: {what}: 'imatrix' must be a path")
            imatrix = Path(os.path.expanduser(imatrix))
            imatrix = imatrix if imatrix.is_absolute() else base / imatrix
        models[mid] = ModelSpec(mid, source, m.get("from"), info, imatrix)
    if not models:
        raise ConvcoreError(f"{path}: no [[model]] tables: nothing to convert")

    jobs: list[Job] = []
    seen: dict[str, str] = {}
    targets = _table_list(data, "target", path)
    if not targets:
        raise ConvcoreError(f"{path}: no [[target]] tables: nothing to convert")
    for i, t in enumerate(targets, 1):
        what = f"[[target]] {i}"
        _unknown(t, TARGET_KEYS, what, path)
        to = t.get("to")
        if not isinstance(to, str) or not to:
            raise ConvcoreError(f"{path}: {what}: 'to' (a format name) is required")
        names = t.get("models") or list(models)
        unknown = [n for n in _as_list(names, f"{what}: models", path) if n not in models]
        if unknown:
            raise ConvcoreError(f"{path}: {what}: unknown model {unknown[0]!r}")
        for key in ("options", "metadata"):
            if not isinstance(t.get(key, {}), dict):
                raise ConvcoreError(f"{path}: {what}: '{key}' must be a table")
        check = _check_spec(t["check"], what, path) if "check" in t else batch_check
        dtype = t.get("dtype")
        quants = _as_list(t.get("quant"), f"{what}: quant", path)
        if t.get("label") is not None and len(quants) > 1:
            raise ConvcoreError(f"{path}: {what}: 'label' needs a single quant")
        try:
            fmt = registry.format(to)
        except ConvcoreError:
            fmt = None  # the job fails alone, saying which plugin is missing
        for name in names:
            for quant in quants:
                label = t.get("label") or quant or dtype or "native"
                _safe_id(label, f"{what}: label", path)
                dst = output_path(out, name, to, label, fmt)
                job_id = f"{name}/{to}-{label}"
                if job_id in seen:
                    raise ConvcoreError(f"{path}: {what}: job {job_id!r} is also made by {seen[job_id]}; "
                                        "give one of them a label")
                seen[job_id] = what
                jobs.append(Job(
                    id=job_id, model=name, source=str(models[name].source), to=to, dst=str(dst),
                    from_=models[name].from_, quant=quant, dtype=dtype, label=label,
                    options=_with_imatrix(dict(t.get("options", {})), models[name], fmt),
                    metadata={k: str(v) for k, v in t.get("metadata", {}).items()},
                    check=check, threads=threads))
    return Plan(path=path, out=out, registry=registry_file, models=models, jobs=jobs,
                parallel=parallel, memory=batch.get("memory"))


def _with_imatrix(options: dict[str, Any], model: ModelSpec, fmt: Any) -> dict[str, Any]:
    """A target's options plus the model's importance matrix where the format takes one
    (and the target sets none of its own)."""
    takes = fmt is not None and any(o.name == "imatrix" for o in getattr(fmt, "options", ()))
    if model.imatrix is not None and takes:
        options.setdefault("imatrix", str(model.imatrix))
    return options


def output_path(out: Path, model: str, to: str, label: str, fmt: Any) -> Path:
    """Where a job writes: a folder per model, a name per format and type."""
    if fmt is not None and not fmt.directory:
        ext = fmt.extensions[0] if fmt.extensions else f".{to}"
        return out / model / f"{model}-{label}{ext}"
    return out / model / f"{to}-{label}"
