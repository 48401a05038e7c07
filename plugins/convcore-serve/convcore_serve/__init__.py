"""convcore plugin ``serve``: models in any format convcore runs, behind an
OpenAI-compatible HTTP API (the app itself is :mod:`convcore_serve.app`; the command,
added through ``convcore_register_commands``, :mod:`convcore_serve.command`).

What is served is a list of :class:`ServedModel`: one per path given on the command
line (its id is the file or directory name, ``x`` for ``x.gguf``), or those a fleet's
``model_registry.json`` lists (:func:`served_models`). Each
model's format is detected at startup, so a path no plugin reads fails before the
server starts; its weights load on the first request that names it.

Starlette and uvicorn are this package's dependencies; importing this module does not
import them, so other packages can build :class:`ServedModel` lists cheaply.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import convcore
from convcore.model import ConvcoreError
from convcore.hub import is_hub_id, resolve
from convcore.registry import get_registry


@convcore.hookimpl
def convcore_register_commands(cli: Any) -> None:
    from .command import serve as serve_command
    cli.add_command(serve_command)

INSTALL_HINT = "convcore serve needs starlette and uvicorn: pip install convcore-serve"


@dataclass
class ServedModel:
    """One model the server answers for, under ``id`` (the ``model`` of a request)."""

    id: str
    path: Path
    fmt: str | None = None
    owned_by: str = "convcore"
    meta: dict = field(default_factory=dict)
    #: LoRA adapters ``[(path, scale)]`` its runtime applies (``serve --lora``)
    lora: tuple = ()

    def card(self) -> dict[str, Any]:
        """The model's entry in ``GET /v1/models``; ``created`` is ``meta["created"]``,
        else the time the model was last written."""
        created = self.meta.get("created")
        if not isinstance(created, int):
            try:
                created = int(Path(self.path).stat().st_mtime)
            except OSError:
                created = 0
        return {"id": self.id, "object": "model", "created": created, "owned_by": self.owned_by}


def model_id(path: Path) -> str:
    """The id a path is served under: a file's name without its extension, a
    directory's name."""
    path = Path(path)
    name = path.name or path.resolve().name
    return Path(name).stem if path.is_file() else name


def is_registry(args: Sequence[Path]) -> bool:
    """Whether the arguments are one fleet registry (a ``.json`` file), not models."""
    return len(args) == 1 and Path(args[0]).is_file() and Path(args[0]).name.endswith(".json")


def served_models(registry_path: Path) -> list[ServedModel]:
    """A ``model_registry.json``'s variants as models to serve, ids ``MODEL/VARIANT``.

    The file is read as docs/fleets.md documents it (``models[].variants[]`` with ``id``,
    ``file`` relative to the registry's folder, ``format``, ``quant``), so serving one needs
    no fleet plugin; ``convcore registry validate`` (convcore-fleet) checks the whole schema."""
    registry_path = Path(registry_path)
    try:
        data = json.loads(registry_path.read_text(encoding="utf-8"))
        models = data["models"]
        pairs = [(m, v) for m in models for v in m["variants"]]
        for model, variant in pairs:
            for key in ("id", "file", "format"):
                if not isinstance(variant.get(key), str):
                    raise KeyError(f"{model.get('id')}: variant without {key!r}")
    except OSError as exc:
        raise ConvcoreError(f"{registry_path}: cannot read: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConvcoreError(f"{registry_path}: not a model registry: {convcore.first_line(exc)}") from None
    base = registry_path.resolve().parent
    out = []
    for model, variant in pairs:
        rel = PurePosixPath(variant["file"])
        if rel.is_absolute() or ".." in rel.parts:
            raise ConvcoreError(f"{registry_path}: path {variant['file']!r} leaves the registry's folder")
        out.append(ServedModel(id=f"{model['id']}/{variant['id']}", path=base.joinpath(*rel.parts),
                               fmt=variant["format"],
                               meta={"model": model["id"], "variant": variant["id"],
                                     "quant": variant.get("quant"), "format": variant["format"]}))
    return out


def models_from_args(args: Sequence[Path]) -> list[ServedModel]:
    """The models to serve: one per path, or those of one ``model_registry.json``; each
    checked to exist and its format detected, ids checked to be unique."""
    if not args:
        raise ConvcoreError("nothing to serve: give model paths or one model_registry.json")
    if is_registry(args):
        models = served_models(Path(args[0]))
        if not models:
            raise ConvcoreError(f"{args[0]}: the registry lists no models to serve")
    else:
        # a hub id is served under that id, from its local snapshot
        models = [ServedModel(str(p), resolve(p)) if is_hub_id(p) and not Path(p).exists()
                  else ServedModel(model_id(p), Path(p)) for p in args]
    registry = get_registry()
    seen: dict[str, Path] = {}
    out = []
    for m in models:
        if m.id in seen:
            raise ConvcoreError(f"two models would be served as {m.id!r}: {seen[m.id]} and {m.path}; "
                                "rename one")
        seen[m.id] = m.path
        if not Path(m.path).exists():
            raise ConvcoreError(f"{m.path}: no such file or directory")
        out.append(m if m.fmt else dataclasses.replace(m, fmt=registry.detect(Path(m.path))))
    return out


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port`` (0 picks a free port), bound before the
    server starts so the port printed is the one it answers on."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        raise ConvcoreError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def log_config() -> dict[str, Any]:
    """uvicorn's logging, all on stderr: its access log (one line per request) but not its
    startup chatter, which the ``serving ...`` line replaces."""
    import uvicorn.config

    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    config["loggers"]["uvicorn.error"]["level"] = "WARNING"
    return config


def serve(models: Sequence[ServedModel], *, host: str = "127.0.0.1", port: int = 8000,
          max_loaded: int = 2, ctx: int | None = None, threads: int | None = None,
          api_key: str | None = None, max_body: int | None = None) -> None:
    """Serve ``models`` until interrupted; every open session is closed on the way out."""
    if any(importlib.util.find_spec(name) is None for name in ("starlette", "uvicorn")):
        raise ConvcoreError(INSTALL_HINT)
    import uvicorn

    from .app import create_app
    from .sessions import SessionPool

    pool = SessionPool(models, max_loaded=max_loaded, ctx=ctx, threads=threads)
    sock = listen(host, port)
    config = uvicorn.Config(create_app(pool, api_key, max_body), log_config=log_config(), lifespan="off",
                            timeout_graceful_shutdown=5)
    print(f"serving {len(models)} model(s) on {url(sock)}", file=sys.stderr, flush=True)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        pool.close()
        sock.close()
