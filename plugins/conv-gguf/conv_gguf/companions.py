"""Files beside the weights that the GGUF writer reads: the sentence-transformers modules
(``modules.json`` and the Pooling module's ``config.json``) and a WordPiece ``vocab.txt``.

A model carries them in ``Model.companions`` (or ``Model.tokenizer``) where its loader
put them there; otherwise, when the model came from a directory, they are read from that
directory.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from convcore import ConvcoreError


def companion(model: Any, name: str) -> bytes | None:
    """The bytes of companion file ``name`` (a relative path) of ``model``, or None."""
    for attr in ("companions", "tokenizer"):
        files = getattr(model, attr, None) or {}
        if name in files:
            return files[name]
    source = Path(str(getattr(model, "source", "") or ""))
    if not str(source) or not source.is_dir():
        return None
    root = source.resolve()
    path = (source / name).resolve()
    try:
        path.relative_to(root)
    except ValueError:   # a name that leaves the model directory is not a companion
        return None
    return path.read_bytes() if path.is_file() else None


def companion_json(model: Any, name: str) -> Any:
    raw = companion(model, name)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ConvcoreError(f"{getattr(model, 'source', '')}: {name} is not valid JSON ({exc})") from None


def pooling_mode(model: Any) -> str | None:
    """The pooling llama.cpp's converter records for ``model`` ("mean", "cls", "last"), or
    None when the model has no sentence-transformers Pooling module. As the converter:
    the first ``sentence_transformers.models.Pooling`` entry of modules.json, and of its
    config.json the first of mean, cls, last token that is on; others are an error."""
    modules = companion_json(model, "modules.json")
    path = None
    for module in modules if isinstance(modules, list) else []:
        if isinstance(module, dict) and module.get("type") == "sentence_transformers.models.Pooling":
            path = str(module.get("path") or "")
            break
    if path is None:
        return None
    name = f"{path.strip('/')}/config.json" if path.strip("/") else "config.json"
    cfg = companion_json(model, name)
    if not isinstance(cfg, dict):
        raise ConvcoreError(f"{getattr(model, 'source', '')}: modules.json names a Pooling module "
                            f"at {path!r} but {name} is missing")
    for key, mode in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls"),
                      ("pooling_mode_lasttoken", "last")):
        if cfg.get(key):
            return mode
    on = [k.removeprefix("pooling_mode_") for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
    raise ConvcoreError(f"{getattr(model, 'source', '')}: {name} asks for {', '.join(on) or 'no'} "
                        "pooling; llama.cpp pools by mean, cls or last token only")


def sentence_transformers_files(mode: str, hidden: int) -> dict[str, bytes]:
    """modules.json and ``1_Pooling/config.json`` of a sentence-transformers model that
    pools by ``mode`` ("mean", "cls", "last"): what a GGUF's pooling type says. (A GGUF
    does not record a Normalize module, so none is written.)"""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    pooling = {"word_embedding_dimension": hidden,
               "pooling_mode_cls_token": mode == "cls", "pooling_mode_mean_tokens": mode == "mean",
               "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
               "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": mode == "last",
               "include_prompt": True}
    return {"modules.json": json.dumps(modules, indent=2).encode(),
            "1_Pooling/config.json": json.dumps(pooling, indent=4).encode()}
