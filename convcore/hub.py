"""Hugging Face hub ids wherever a model path is taken: ``org/name`` or
``org/name@revision``, fetched by huggingface_hub into its own cache.

Only what a reader needs is fetched: the weights in one form (safetensors over ``.bin``,
never ``consolidated.*`` or another framework's files), the config, tokenizer, generation
config and the other small files of the top folder (model card, licence, chat template),
and sentence-transformers' module folders. huggingface_hub does the rest: its cache
(``HF_HOME`` / ``HF_HUB_CACHE``), ``HF_TOKEN``, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``, its
progress bars, and resuming a download that broke off. A local path of the same name wins.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from .model import ConvcoreError

HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+)(?:@(?P<rev>[A-Za-z0-9_./-]+))?")
#: the small files of a model folder a reader or a companion may use
SMALL = (".json", ".model", ".txt", ".jinja", ".tiktoken", ".md", ".py", ".yaml", ".yml")
MODULE = re.compile(r"[0-9]+_[^/]+/[^/]+")   # sentence-transformers: 1_Pooling/config.json
_NOTED: set[str] = set()


def is_hub_id(text: str | Path) -> bool:
    """Whether ``text`` has the shape of a hub id (it may still name a local path)."""
    text = str(text)
    return bool(HUB_ID.fullmatch(text)) and not text.startswith((".", "/", "~"))


def wanted(files: list[str], weights: bool = True) -> list[str]:
    """The files of a repository a conversion needs (without the weights when not
    ``weights``: what ``convcore fake`` reads)."""
    top = [f for f in files if "/" not in f]
    safetensors = [f for f in top if f.endswith(".safetensors") and not f.startswith("consolidated")]
    index = [f for f in top if f.endswith(".safetensors.index.json")]
    if safetensors:
        weight_files = safetensors + index
    else:
        weight_files = [f for f in top if re.fullmatch(r"(pytorch_model|adapter_model).*\.bin(\.index\.json)?", f)]
    small = [f for f in top if f.endswith(SMALL) and not f.endswith(".index.json")]
    small += [f for f in top if f.upper().startswith(("LICENSE", "NOTICE", "USE_POLICY"))]
    modules = [f for f in files if MODULE.fullmatch(f)]
    if not weights:   # the caller reads no tensors (convcore fake)
        return sorted(set(small + modules))
    if not weight_files and any(f.endswith(".gguf") for f in top):
        raise ConvcoreError("holds GGUF files only: download the one you want "
                            "(huggingface-cli download REPO FILE.gguf) and give its path")
    return sorted(set(weight_files + small + modules))


def resolve(path: str | Path, weights: bool = True) -> Path:
    """``path`` itself when it exists (or is no hub id), else the local snapshot of the
    hub id it is, downloaded or found in the cache (without its weights when not
    ``weights``)."""
    local = Path(path)
    text = str(path)
    if local.exists() or not is_hub_id(text):
        if local.exists() and is_hub_id(text) and text not in _NOTED and "/" in text:
            _NOTED.add(text)
            print(f"note: {text}: the local path is used, not the hub id of that name", file=sys.stderr)
        return local
    found = HUB_ID.fullmatch(text)
    assert found is not None
    return download(found["repo"], found["rev"], weights)


def download(repo: str, revision: str | None = None, weights: bool = True) -> Path:
    """The snapshot folder of ``repo`` at ``revision`` (default: main) with the files a
    conversion needs, through huggingface_hub."""
    try:
        import huggingface_hub
        from huggingface_hub import constants, errors
    except ImportError:
        raise ConvcoreError(f"{repo}: not a local path; hub ids need huggingface_hub "
                            "(pip install huggingface_hub)") from None
    named = f"{repo}@{revision}" if revision else repo
    try:
        if constants.HF_HUB_OFFLINE:
            # no file list offline: what an earlier run fetched is what a conversion needs
            return Path(huggingface_hub.snapshot_download(repo, revision=revision,
                                                          allow_patterns=_cached(repo, revision, constants)))
        info = huggingface_hub.HfApi().model_info(repo, revision=revision)
        files = [s.rfilename for s in info.siblings or []]
        try:
            patterns = wanted(files, weights)
        except ConvcoreError as exc:
            raise ConvcoreError(f"{named}: {exc}") from None
        if not patterns:
            raise ConvcoreError(f"{named}: the repository holds no model files")
        return Path(huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except ConvcoreError:
        raise
    except errors.GatedRepoError:
        raise ConvcoreError(f"{named}: a gated repository: accept its terms on the hub and set HF_TOKEN "
                            "(or run huggingface-cli login)") from None
    except errors.RevisionNotFoundError:
        raise ConvcoreError(f"{named}: the repository has no revision {revision!r}") from None
    except errors.RepositoryNotFoundError:
        raise ConvcoreError(f"{named}: no such model on the hub (a private one needs HF_TOKEN)") from None
    except (errors.LocalEntryNotFoundError, getattr(errors, "IncompleteSnapshotError", errors.LocalEntryNotFoundError)):
        raise ConvcoreError(f"{named}: not in the local hub cache and HF_HUB_OFFLINE is set: "
                            "download it once online, or unset HF_HUB_OFFLINE") from None
    except (errors.HfHubHTTPError, OSError, ValueError) as exc:
        raise ConvcoreError(f"{named}: cannot fetch it from the hub ({_first(exc)}); "
                            "HF_HUB_OFFLINE=1 uses the local cache only") from None
    except Exception as exc:   # noqa: BLE001 - a network library's own errors (httpx)
        if type(exc).__module__.split(".")[0] in ("httpx", "httpcore", "requests", "urllib3"):
            raise ConvcoreError(f"{named}: cannot reach the hub ({_first(exc)}); "
                                "HF_HUB_OFFLINE=1 uses the local cache only") from None
        raise


def _cached(repo: str, revision: str | None, constants: Any) -> list[str]:
    """The files of ``repo``'s cached snapshot (at ``revision``, a branch, tag or commit)."""
    root = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    ref = root / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else (revision or "")
    snapshot = root / "snapshots" / commit
    if not commit or not snapshot.is_dir():
        return ["config.json"]   # snapshot_download then says it is not cached
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file() or p.is_symlink())


def _first(exc: BaseException) -> Any:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
