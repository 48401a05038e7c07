"""load -> map names -> quantize -> write -> validate, one tensor at a time.

The writer pulls tensors from the lazy model; the pipeline owns what is common to every
format: option checks, the temporary output beside DST and its atomic rename, refusal
to overwrite, validation of what was written, and the progress bar.
"""
from __future__ import annotations

import contextvars
import errno
import os
import shutil
import sys
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np

from .destination import check_location, check_replaceable
from .hub import resolve
from .lora import adapter_info, with_loras
from .model import ConvcoreError, Model, TensorRef, has_nonfinite, one_line
from .options import check_options
from .registry import FLOAT_SCHEMES, Registry, get_registry, using

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], jobs: int = 1) -> Iterator[R]:
    """``map(fn, items)`` on up to ``jobs`` threads, results in input order, at most
    ``jobs + 1`` results in memory (so streaming stays bounded). Numba kernels release
    the GIL, so quantization scales with threads."""
    if jobs <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        pending: deque = deque()
        for item in items:
            # each task runs in a copy of the caller's context, so the registry a
            # conversion is using (a context variable) is the one workers see
            pending.append(pool.submit(contextvars.copy_context().run, fn, item))
            if len(pending) > jobs:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def default_jobs() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def normalise_types(fmt_schemes: tuple[str, ...], fmt: str, quant: str | None,
                    dtype: str | None) -> tuple[str | None, str | None]:
    """(quant, dtype) with float ``--quant`` folded into ``dtype``; errors for types the
    format cannot store."""
    if dtype is not None and dtype not in FLOAT_SCHEMES:
        raise ConvcoreError(f"--dtype must be one of {', '.join(FLOAT_SCHEMES)}, not {dtype!r}")
    if quant in FLOAT_SCHEMES:
        if dtype and dtype != quant:
            raise ConvcoreError(f"--quant {quant} and --dtype {dtype} disagree")
        return None, quant
    if quant is not None and quant not in fmt_schemes:
        stored = ", ".join(dict.fromkeys(FLOAT_SCHEMES + tuple(fmt_schemes)))
        raise ConvcoreError(f"format {fmt} cannot store {quant!r} (it stores: {stored})")
    return quant, dtype


def _progress_bar(total: int, enabled: bool, desc: str) -> tuple[Callable[[str], None], Callable[[], None]]:
    if not enabled:
        return (lambda name: None), (lambda: None)
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, leave=False,
               disable=None)  # None: only on a terminal

    def advance(name: str) -> None:
        bar.set_postfix_str(name[-40:], refresh=False)
        bar.update(1)

    return advance, bar.close


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str,
    *,
    from_: str | None = None,
    quant: str | None = None,
    dtype: str | None = None,
    metadata: dict[str, str] | None = None,
    jobs: int | None = None,
    force: bool = False,
    validate: bool = True,
    options: dict[str, Any] | None = None,
    progress: bool = False,
    registry: Registry | None = None,
    allow_nonfinite: bool = False,
    base: str | os.PathLike | None = None,
    loras: Iterable[str] = (),
    load_options: dict[str, Any] | None = None,
) -> Path:
    """Convert the model at ``src`` to format ``to`` at ``dst``; the Python face of
    ``convcore run``. Returns the path written (the first file for split outputs).

    A float tensor holding NaN or Inf is an error naming it (by its name in the source,
    and the file it is in) unless ``allow_nonfinite``.

    ``base`` is the base model of an adapter ``src`` (PEFT or mlx-lm); ``loras`` are
    ``ADAPTER[:SCALE]`` adapters merged into each weight as it streams. ``load_options``
    go to the reader (the ``fake`` format's ``init``, ``seed``, ``layers``).

    ``options`` are the target format's declared options (what ``-O KEY=VALUE`` sets);
    an undeclared or ill-typed one is an error before any work starts.

    DST appears only when everything succeeded: the writer works on a temporary name
    beside it, which is renamed into place at the end and removed on any failure.
    """
    registry = registry or get_registry()
    with using(registry):
        return _convert(registry, Path(src), Path(dst), to, from_, quant, dtype, metadata,
                        jobs, force, validate, options, progress, allow_nonfinite,
                        None if base is None else str(base), list(loras), load_options)


def _convert(registry: Registry, src: Path, dst: Path, to: str, from_: str | None,
             quant: str | None, dtype: str | None, metadata: dict[str, str] | None,
             jobs: int | None, force: bool, validate: bool, options: dict[str, Any] | None,
             progress: bool, allow_nonfinite: bool = False, base: str | None = None,
             loras: list[str] | None = None, load_options: dict[str, Any] | None = None) -> Path:
    out_fmt = registry.format(to)
    given, src = src, resolve(src)   # a hub id: its local snapshot
    if not src.exists():
        raise ConvcoreError(f"{src}: no such file or directory")
    if not out_fmt.can_write:
        raise ConvcoreError(f"format {to!r} can be read but not written")
    quant, dtype = normalise_types(out_fmt.schemes, to, quant, dtype)
    opts = check_options(to, out_fmt.options, dict(options or {}))
    dry_run = bool(opts.get("dry_run"))
    check_location(dst, src)
    if (dst.exists() or dst.is_symlink()) and not dry_run:
        if not force:
            raise ConvcoreError(f"{dst}: already exists; pass --force to overwrite")
        check_replaceable(dst, out_fmt)

    model = registry.load(src, from_, {**(load_options or {}), **({"base": base} if base else {})})
    if given != src:   # named after the repository, not its snapshot folder
        model.metadata.setdefault("hub_id", str(given))
        model.metadata.setdefault("name", str(given).split("@")[0].split("/")[-1])
    if adapter_info(model) is not None:
        if loras:
            raise ConvcoreError(f"{src}: is an adapter; --lora merges adapters into a base model")
        if not out_fmt.adapters:
            adapter_formats = ", ".join(f.name for f in registry.formats.values() if f.adapters) or "none"
            raise ConvcoreError(f"{src}: is a LoRA adapter; format {to} cannot store one (adapter "
                                f"outputs: {adapter_formats}); to merge it, run BASE --lora {src}")
    elif base:
        raise ConvcoreError(f"{src}: --base is for adapter sources; this is a {model.format} model")
    if loras:
        from .builtins.adapters import load_adapter

        model = with_loras(model, loras, load_adapter)
    if model.metadata.get("unmapped"):
        # a reader that could describe the file but not map it (inspect shows it)
        raise ConvcoreError(f"{src}: {model.metadata['unmapped']}; it can be inspected, not converted")
    model.metadata.update(metadata or {})
    if not allow_nonfinite:
        for name, ref in list(model.tensors.items()):
            model.tensors[name] = _finite_only(ref, src)
    opts.update(quant=quant, dtype=dtype, metadata=dict(metadata or {}),
                jobs=jobs or default_jobs())
    if dry_run:
        return registry.write(model, dst, to, opts, lambda name: None)

    dst.parent.mkdir(parents=True, exist_ok=True)
    # Directory formats are written to a hidden sibling directory; file formats into a
    # hidden sibling directory under their final name (so split shards get final names).
    staging = dst.parent / f".{dst.name}.convcore-{uuid.uuid4().hex[:8]}"
    target = staging if out_fmt.directory else staging / dst.name
    close: Callable[[], None] = lambda: None  # noqa: E731
    stage = "write"
    try:  # from the staging directory's creation on: an interrupt anywhere removes it
        if not out_fmt.directory:
            staging.mkdir()
        advance, close = _progress_bar(len(model.tensors), progress, f"{model.format} -> {to}")
        written = registry.write(model, target, to, opts, advance)
        close()
        if validate:
            stage = "validate"
            problems = registry.validate(target, to)
            if problems:
                raise ConvcoreError(f"{dst}: written output fails validation: {problems[0]}")
        stage = "move"
        return _move_into_place(staging, dst, out_fmt, written, force)
    except BaseException as exc:
        close()
        failure = _explain(exc, dst, staging, out_fmt, stage)  # before the staged files go
        _remove(staging)
        if failure is None:
            raise
        raise failure from exc


def _explain(exc: BaseException, dst: Path, staging: Path, fmt: Any, stage: str) -> ConvcoreError | None:
    """``exc`` out of writing, validating or moving the output as one error naming DST
    (not the temporary name) and what failed: the OS's reason for an OSError (a full disk,
    a file size limit), the plugin for any other exception. None: re-raise ``exc``."""
    if isinstance(exc, OSError):
        return ConvcoreError(f"{dst}: cannot write the output: {_os_reason(exc, staging)}")
    if isinstance(exc, ConvcoreError):  # a plugin's message may name the temporary path
        text = str(exc)
        named = (text.replace(str(staging), str(dst)) if fmt.directory
                 else text.replace(f"{staging}{os.sep}", f"{dst.parent}{os.sep}"))
        return None if named == text else ConvcoreError(named)
    if isinstance(exc, Exception) and not isinstance(exc, MemoryError):
        doing = {"write": f"the {fmt.name} writer (plugin {fmt.plugin})",
                 "validate": f"validating the {fmt.name} output",
                 "move": "moving the output into place"}[stage]
        return ConvcoreError(f"{dst}: {doing} failed: {one_line(exc)}")
    return None


def _os_reason(exc: OSError, staging: Path) -> str:
    """The OS's reason for a failed write. numpy's short writes (``tofile``: "N requested
    and M written") carry none, so an exceeded file size limit or a full disk is looked for."""
    if exc.strerror:
        return exc.strerror
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        capped = limit != resource.RLIM_INFINITY
    except (ImportError, OSError, AttributeError):  # no such limits here
        limit, capped = 0, False
    if capped and any(p.is_file() and p.stat().st_size >= limit for p in staging.rglob("*")):
        return os.strerror(errno.EFBIG)
    try:
        if shutil.disk_usage(staging.parent).free < 1 << 20:
            return os.strerror(errno.ENOSPC)
    except OSError:
        pass
    return one_line(exc)


def _finite_only(ref: TensorRef, src: Path) -> TensorRef:
    """``ref`` whose load (and load_as, load_chunks) refuses NaN and Inf, naming the tensor
    and its file.
    Checked on the first load only (writers that stream a tensor in row slices load it per
    slice)."""
    checked = False

    def check(array: np.ndarray) -> np.ndarray:
        nonlocal checked
        if not checked:
            if has_nonfinite(array):
                raise ConvcoreError(f"{ref.source or src}: tensor {ref.name} holds NaN or Inf "
                                    "values; pass --allow-nonfinite to convert it anyway")
            checked = True
        return array

    def checked_pieces(dtype: str) -> Iterator[np.ndarray]:
        for piece in ref.load_chunks(dtype):
            if has_nonfinite(piece):
                raise ConvcoreError(f"{ref.source or src}: tensor {ref.name} holds NaN or Inf "
                                    "values; pass --allow-nonfinite to convert it anyway")
            yield piece

    cast_load = None if ref.cast_loader is None else (lambda dtype: check(ref.load_as(dtype)))
    return ref.with_loader(lambda: check(ref.load()), cast_loader=cast_load,
                           chunk_loader=None if ref.chunk_loader is None else checked_pieces)


def _move_into_place(staging: Path, dst: Path, fmt: Any, written: Path, force: bool) -> Path:
    """Rename the finished output into place. What it replaces (checked again here, as
    the tree may have changed while writing) is set aside first and removed only once
    the new output is in place."""
    directory = fmt.directory
    if directory:
        moves = [(staging, dst)]
    else:
        moves = [(p, dst.parent / p.name) for p in sorted(staging.iterdir())]
    clash = [d for _, d in moves if d.exists() or d.is_symlink()]
    if clash and not force:
        raise ConvcoreError(f"{clash[0]}: already exists; pass --force to overwrite")
    for d in clash:
        check_replaceable(d, fmt)
    backups: list[tuple[Path, Path]] = []
    done: list[tuple[Path, Path]] = []
    try:
        for d in clash:
            backup = d.parent / f".{d.name}.convcore-old-{uuid.uuid4().hex[:8]}"
            d.rename(backup)
            backups.append((d, backup))
        replaced = {d for d, _ in backups}
        for s, d in moves:
            done.append((s, d))  # before the move: an interrupt may land halfway through it
            if d in replaced:
                s.rename(d)
            else:
                _rename_no_replace(s, d)
    except BaseException:
        # put everything back as it was: the new output into staging (removed by the
        # caller), the old output under its own name
        for s, d in reversed(done):
            if not s.exists():  # moved
                d.rename(s)
            elif d.is_file() and not d.is_symlink() and os.path.samefile(s, d):
                d.unlink()  # linked, not yet unlinked from staging
        for d, backup in reversed(backups):
            backup.rename(d)
        raise
    for _, backup in backups:
        _remove(backup)
    if not directory:
        staging.rmdir()
        return dst.parent / Path(written).name
    return dst


def _rename_no_replace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists, atomically: another conversion to
    the same DST that finished first keeps its output, and this one fails. Files move by
    a hard link (which refuses an existing name) and an unlink; a directory's rename
    refuses a non-empty one."""
    exists = ConvcoreError(f"{dst}: already exists; pass --force to overwrite")
    if src.is_dir() and not src.is_symlink():
        try:
            src.rename(dst)
        except (FileExistsError, IsADirectoryError, NotADirectoryError):
            raise exists from None
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise exists from None
            raise
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise exists from None
    except OSError:  # a file system without hard links: a plain rename, after a last look
        if dst.exists() or dst.is_symlink():
            raise exists from None
        src.rename(dst)
        return
    src.unlink()


def load(path: str | os.PathLike, fmt: str | None = None, registry: Registry | None = None) -> Model:
    """Open a model lazily (format detected when ``fmt`` is None)."""
    return (registry or get_registry()).load(Path(path), fmt)


def prepare(schemes: Any, dtypes: Any = ("f32", "f16", "bf16"),
            registry: Registry | None = None) -> None:
    """Make the registered schemes ``schemes`` ready for input of ``dtypes`` ahead of use
    (their plugins' ``Scheme.prepare``, e.g. compiling kernels side by side); optional."""
    (registry or get_registry()).prepare(schemes, dtypes)


def quantize(tensor: Any, scheme: str, options: dict[str, Any] | None = None,
             registry: Registry | None = None) -> Any:
    """Quantize one tensor (a :class:`TensorRef` or an array) with a registered scheme,
    through the ``convcore_quantize`` hook."""
    return (registry or get_registry()).quantize(tensor, scheme, options)
