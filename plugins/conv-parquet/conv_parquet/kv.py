"""What a Parquet weight file keeps in its key-value metadata, so Parquet -> HF is
lossless: ``config.json`` and ``generation_config.json`` verbatim, each tokenizer file
under ``tokenizer/<name>`` (UTF-8 files verbatim, others base64 under
``tokenizer/<name>.base64``), and ``convcore.*`` keys: ``convcore.format_version``,
``convcore.schema`` (``V1``/``V2``), ``convcore.arch``, ``convcore.metadata`` (JSON) and,
in each part of a split output, ``convcore.part`` (``"<index>/<count>"``).
Values are text, so every Parquet reader (duckdb's ``parquet_kv_metadata``, Spark) shows
them as they are.
"""
from __future__ import annotations

import base64
import json
from typing import Any

from convcore import ConvcoreError, Model

FORMAT_VERSION = "1"
CONFIG = "config.json"
GENERATION = "generation_config.json"
TOKENIZER = "tokenizer/"
BASE64 = ".base64"
PART = "convcore.part"


def encode(model: Model, schema: str) -> dict[str, str]:
    """The key-value metadata describing ``model`` (written once, in the first part)."""
    meta = {k: v for k, v in model.metadata.items() if k not in ("source", "generation_config")}
    kv = {"convcore.format_version": FORMAT_VERSION, "convcore.schema": schema,
          "convcore.arch": model.arch, "convcore.metadata": json.dumps(meta, default=str, sort_keys=True),
          CONFIG: json.dumps(model.config, indent=2, sort_keys=True)}
    if model.metadata.get("generation_config"):
        kv[GENERATION] = json.dumps(model.metadata["generation_config"], indent=2)
    for name, data in (model.tokenizer or {}).items():
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not isinstance(data, (bytes, bytearray)):
            continue  # a parsed vocab is not a file; formats that keep one rebuild it
        try:
            kv[TOKENIZER + name] = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            kv[TOKENIZER + name + BASE64] = base64.b64encode(data).decode("ascii")
    return kv


def as_text(kv: dict[bytes, bytes] | None) -> dict[str, str]:
    """pyarrow's ``{bytes: bytes}`` metadata as text (undecodable entries dropped: they
    are not ours)."""
    out = {}
    for k, v in (kv or {}).items():
        try:
            out[k.decode("utf-8")] = v.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return out


def _json(kv: dict[str, str], key: str, where: str) -> Any:
    try:
        return json.loads(kv[key])
    except ValueError as exc:
        raise ConvcoreError(f"{where}: metadata {key!r} is not valid JSON ({exc})") from None


def decode(kv: dict[str, str], where: str) -> tuple[dict[str, Any] | None, dict[str, bytes], dict[str, Any]]:
    """(config or None, tokenizer files, metadata) from a file's key-value metadata."""
    config = _json(kv, CONFIG, where) if CONFIG in kv else None
    if config is not None and not isinstance(config, dict):
        raise ConvcoreError(f"{where}: metadata {CONFIG!r} is not a JSON object")
    tokenizer: dict[str, bytes] = {}
    for key, value in kv.items():
        if not key.startswith(TOKENIZER):
            continue
        name = key[len(TOKENIZER):]
        plain = name[: -len(BASE64)] if name.endswith(BASE64) else name
        if "/" in plain or "\\" in plain or plain in ("", ".", ".."):
            raise ConvcoreError(f"{where}: tokenizer file name {plain!r} is not a plain name")
        if name.endswith(BASE64):
            try:
                tokenizer[name[: -len(BASE64)]] = base64.b64decode(value, validate=True)
            except ValueError:
                raise ConvcoreError(f"{where}: metadata {key!r} is not base64") from None
        else:
            tokenizer[name] = value.encode("utf-8")
    metadata: dict[str, Any] = {}
    if "convcore.metadata" in kv:
        meta = _json(kv, "convcore.metadata", where)
        if isinstance(meta, dict):
            metadata.update(meta)
    if GENERATION in kv:
        metadata["generation_config"] = _json(kv, GENERATION, where)
    return config, tokenizer, metadata


def part_of(kv: dict[str, str], where: str) -> tuple[int, int] | None:
    """(index, count) a part file declares, or None."""
    if PART not in kv:
        return None
    try:
        index, count = (int(x) for x in kv[PART].split("/"))
        if not 0 <= index < count:
            raise ValueError
    except ValueError:
        raise ConvcoreError(f"{where}: metadata {PART!r} is {kv[PART]!r}, expected <index>/<count>") from None
    return index, count
