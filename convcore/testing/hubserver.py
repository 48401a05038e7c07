"""A local stand-in for the Hugging Face hub's HTTP API, serving model folders, so tests
download with the real huggingface_hub client (pointed at it through ``HF_ENDPOINT``)
without a network.

It answers what ``snapshot_download`` asks: ``GET /api/models/{repo}[/revision/{rev}]``
(the commit and the file list), ``GET /api/models/{repo}/tree/{rev}`` (the files with
their sizes) and ``HEAD``/``GET /{repo}/resolve/{rev}/{file}`` (the
commit, the file's etag and size; ``Range`` for resumed downloads), with the hub's
``X-Error-Code`` for a missing or gated repository or revision. It records every request
and can cut a file's first transfer short, as a dropped connection does.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    folder: Path
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    gated: bool = False

    def files(self) -> list[str]:
        return sorted(p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*") if p.is_file())


@dataclass
class HubServer:
    """``with HubServer({"org/name": Repo(folder)}) as hub:`` serves at ``hub.url``."""

    repos: dict[str, Repo]
    #: files whose first GET stops after this many bytes (the connection drops)
    cut: dict[str, int] = field(default_factory=dict)
    requests: list[tuple[str, str, str]] = field(default_factory=list)   # (method, path, Range)

    def __enter__(self) -> "HubServer":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:   # quiet
                pass

            def do_HEAD(self) -> None:
                hub._answer(self, head=True)

            def do_GET(self) -> None:
                hub._answer(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def downloaded(self) -> list[str]:
        """Paths of the files whose bytes were sent (a GET of a resolve URL)."""
        return sorted({p.split("/resolve/", 1)[1].split("/", 1)[1] for m, p, _ in self.requests
                       if m == "GET" and "/resolve/" in p})

    # ------------------------------------------------------------------------------
    def _error(self, h: BaseHTTPRequestHandler, status: int, code: str) -> None:
        body = json.dumps({"error": code}).encode()
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _json(self, h: BaseHTTPRequestHandler, data: Any, head: bool) -> None:
        body = json.dumps(data).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _repo(self, h: BaseHTTPRequestHandler, repo_id: str, rev: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 404, "RepoNotFound")
            return None
        if repo.gated:
            self._error(h, 403, "GatedRepo")
            return None
        if rev not in ("main", repo.commit):
            self._error(h, 404, "RevisionNotFound")
            return None
        return repo

    def _answer(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append(("HEAD" if head else "GET", path, h.headers.get("Range", "")))
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if api:
            repo = self._repo(h, api[1], api[2] or "main")
            if repo is not None:
                self._json(h, {"id": api[1], "modelId": api[1], "sha": repo.commit, "private": False,
                               "gated": False, "disabled": False, "tags": [],
                               "siblings": [{"rfilename": f} for f in repo.files()]}, head)
            return
        tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
        if tree:   # the file list (recursive), as list_repo_tree reads it
            repo = self._repo(h, tree[1], tree[2])
            if repo is not None:
                self._json(h, [{"type": "file", "path": f, "size": (repo.folder / f).stat().st_size,
                                "oid": hashlib.sha1((repo.folder / f).read_bytes()).hexdigest()}
                               for f in repo.files() if f.startswith(tree[3] or "")], head)
            return
        found = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if not found:
            self._error(h, 404, "RepoNotFound")
            return
        repo = self._repo(h, found[1], found[2])
        if repo is None:
            return
        file = repo.folder / found[3]
        if not file.is_file():
            self._error(h, 404, "EntryNotFound")
            return
        data = file.read_bytes()
        start = 0
        ranged = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", ""))
        if ranged:
            start = int(ranged[1])
        h.send_response(206 if ranged else 200)
        h.send_header("X-Repo-Commit", repo.commit)
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(len(data) - start))
        if ranged:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if head:
            return
        stop = self.cut.pop(found[3], None)
        if stop is not None and not ranged:
            h.wfile.write(data[:stop])   # the connection drops mid-file
            assert stop < len(data), "the cut must fall inside the file"
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(data[start:])
