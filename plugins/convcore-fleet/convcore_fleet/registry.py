"""``model_registry.json``: the models a fleet made and their variants.

The file is checked against the published JSON Schema (``model_registry.schema.json``
beside this module; ``convcore registry schema`` prints it) every time it is read or
written, and written atomically (a temporary name, then a rename). Paths inside it are
relative to the registry file and must stay inside its folder.
"""
from __future__ import annotations

import json
import os
import uuid
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from convcore.model import ConvcoreError

SCHEMA_PATH = Path(__file__).with_name("model_registry.schema.json")
SCHEMA_VERSION = 1


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def empty() -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "updated": now(), "models": []}


def problems(data: Any) -> list[str]:
    """Every way ``data`` breaks the schema or the rules it cannot say (unique ids,
    paths inside the registry's folder); empty when valid."""
    try:
        from jsonschema import Draft202012Validator
    except ImportError:  # pragma: no cover - a declared dependency
        raise ConvcoreError("checking a model registry needs jsonschema: pip install jsonschema") from None
    out = []
    validator = Draft202012Validator(schema(), format_checker=Draft202012Validator.FORMAT_CHECKER)
    for err in sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path)):
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path) or "(top)"
        out.append(f"{where}: {err.message}")
    if out:
        return out
    seen: set[str] = set()
    for i, model in enumerate(data["models"]):
        if model["id"] in seen:
            out.append(f".models[{i}].id: model id {model['id']!r} appears twice")
        seen.add(model["id"])
        variants: set[str] = set()
        for j, v in enumerate(model["variants"]):
            if v["id"] in variants:
                out.append(f".models[{i}].variants[{j}].id: variant {v['id']!r} appears twice")
            variants.add(v["id"])
    return out


def read(path: Path, missing_ok: bool = False) -> dict[str, Any]:
    """The registry at ``path`` (an empty one if absent and ``missing_ok``); one-line
    errors name the file and the first problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return empty()
        raise ConvcoreError(f"{path}: no such model registry") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConvcoreError(f"{path}: cannot read ({type(exc).__name__})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConvcoreError(f"{path}: not JSON: {exc}") from None
    found = problems(data)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise ConvcoreError(f"{path}: not a valid model registry: {found[0]}{more}")
    return data


def write(path: Path, data: dict[str, Any]) -> None:
    """Check and write ``data`` to ``path`` atomically."""
    data["updated"] = now()
    found = problems(data)
    if found:
        raise ConvcoreError(f"{path}: refusing to write an invalid model registry: {found[0]}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def relative(path: Path, registry_path: Path) -> str:
    """``path`` relative to the registry's folder, which it must be inside."""
    base = Path(registry_path).resolve().parent
    try:
        return Path(path).resolve().relative_to(base).as_posix()
    except ValueError:
        raise ConvcoreError(f"{path}: is outside the registry's folder {base}; "
                            "a registry only lists files under its own folder") from None


def model_entry(data: dict[str, Any], model_id: str) -> dict[str, Any] | None:
    return next((m for m in data["models"] if m["id"] == model_id), None)


def upsert(data: dict[str, Any], model: dict[str, Any], variant: dict[str, Any] | None) -> None:
    """Add or update the model (its name, source and metadata: given keys win) and put
    ``variant`` in place of the one with the same id."""
    entry = model_entry(data, model["id"])
    if entry is None:
        entry = {"id": model["id"], "name": model.get("name") or model["id"],
                 "source": model.get("source") or "", "metadata": {}, "variants": []}
        data["models"].append(entry)
    for key in ("name", "source", "description"):
        if model.get(key):
            entry[key] = model[key]
    meta = entry["metadata"]
    for key, value in model.get("metadata", {}).items():
        if value is not None or key not in meta:
            meta[key] = value
    for key in ("architecture", "parameters", "context_length", "license"):
        meta.setdefault(key, None)
    if variant is not None:
        entry["variants"] = [v for v in entry["variants"] if v["id"] != variant["id"]] + [variant]
        entry["variants"].sort(key=lambda v: v["id"])
    data["models"].sort(key=lambda m: m["id"])


def resolve(registry_path: Path, relpath: str) -> Path:
    """A path named in the registry, as a path on disk (inside the registry's folder)."""
    base = Path(registry_path).resolve().parent
    pure = PurePosixPath(relpath)
    if pure.is_absolute() or ".." in pure.parts:
        raise ConvcoreError(f"{registry_path}: path {relpath!r} leaves the registry's folder")
    return base.joinpath(*pure.parts)


def find(data: dict[str, Any], ident: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``MODEL`` or ``MODEL/VARIANT`` -> (model, variant or None)."""
    model_id, _, variant_id = ident.partition("/")
    model = model_entry(data, model_id)
    if model is None:
        raise ConvcoreError(f"no model {model_id!r} in the registry "
                            f"(it has: {', '.join(m['id'] for m in data['models']) or 'none'})")
    if not variant_id:
        return model, None
    variant = next((v for v in model["variants"] if v["id"] == variant_id), None)
    if variant is None:
        raise ConvcoreError(f"model {model_id!r} has no variant {variant_id!r} "
                            f"(it has: {', '.join(v['id'] for v in model['variants']) or 'none'})")
    return model, variant


def variants(data: dict[str, Any]) -> Iterable[tuple[dict[str, Any], dict[str, Any]]]:
    for model in data["models"]:
        for variant in model["variants"]:
            yield model, variant
