"""Plugin discovery and the typed facade the core calls hooks through.

Plugins are found through the entry-point group ``convcore``. Built-in code registers
as ordinary plugins from :data:`DEFAULT_PLUGINS`. A plugin that fails to import is
recorded with its error and skipped, never fatal.

Environment:
- ``CONVCORE_LOAD_PLUGINS``: comma list of entry-point names to load (empty = none).
- ``CONVCORE_DISABLE_PLUGINS``: comma list of plugin names not to load.
- ``CONVCORE_TRACE_PLUGINS``: print every hook call and its results to stderr.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import sys
import warnings
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pluggy

from . import hookspecs
from .model import ConvcoreError, Model, QuantizedTensor, TensorRef, one_line
from .options import Option
from .hub import is_hub_id, resolve
from .runtime import Session

DEFAULT_PLUGINS = ("convcore.builtins.hf", "convcore.builtins.adapters", "convcore.builtins.fake",
                   "convcore.builtins.quantize", "convcore.builtins.infer")
ENTRY_POINT_GROUP = "convcore"
FLOAT_SCHEMES = ("f32", "f16", "bf16")


@dataclass(frozen=True)
class Format:
    """A file format a plugin reads and/or writes.

    :param name: the name users pass to ``--from`` / ``--to``.
    :param directory: True when the format is a directory (``-o DIR``), else a file.
    :param can_read: a ``convcore_load`` implementation handles it.
    :param can_write: a ``convcore_write`` implementation handles it.
    :param schemes: quantization schemes it can store (f32/f16/bf16 are implied).
    :param detect: ``detect(path) -> int``: how sure this format is that ``path`` is its
        own (0 = not mine); the highest score wins when ``--from`` is omitted.
    :param extensions: file suffixes, for file formats.
    :param outputs: for directory formats, glob patterns of the entries a writer of this
        format may leave in its output directory (a trailing ``/`` marks a folder), e.g.
        ``("config.json", "model*.safetensors", "model.safetensors.index.json")``. With
        ``--force`` an existing directory is replaced only when each entry matches one of
        these or a companion file (tokenizer, model card, ...); undeclared means nothing
        but companion files may be replaced. A file format that writes split outputs as
        a directory of parts declares the parts' names here (``("part-*.parquet",)``), so
        such a directory may be replaced too.
    :param options: the :class:`convcore.Option` s its writer accepts (``-O KEY=VALUE``
        and the flags ``--split-max-size``, ``--split-max-tensors``, ``--vocab-only``,
        ``--dry-run``); anything else is refused before work starts.
    :param scheme_package: the distribution that implements the schemes it lists, named
        in the error when one of them is not installed (e.g. ``"my-kernels"``).
    :param architectures: ``architectures() -> {model_type: {"write": bool, "read": bool,
        "checked": bool, "note": str}}``: the HF architectures the format converts (its
        writer's tables), whether its reader gives them back and whether the plugin's
        tests check them in the format's runtime; None for formats that take any
        architecture (weight stores). ``convcore formats --archs`` tabulates them.
    :param adapters: its writer also writes LoRA adapters (a model whose
        ``metadata["adapter"]`` is set, see :mod:`convcore.lora`) as the runtime's adapter
        file; other writers are never handed one.
    """

    name: str
    description: str = ""
    directory: bool = False
    can_read: bool = True
    can_write: bool = True
    schemes: tuple[str, ...] = ()
    detect: Callable[[Path], int] | None = None
    extensions: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    options: tuple[Option, ...] = ()
    scheme_package: str = ""
    plugin: str = ""
    architectures: Callable[[], dict[str, dict[str, Any]]] | None = None
    adapters: bool = False

    @property
    def all_schemes(self) -> tuple[str, ...]:
        return FLOAT_SCHEMES + tuple(s for s in self.schemes if s not in FLOAT_SCHEMES)


LayoutSpec = dict[str, tuple[str, tuple[int, ...]]]

#: The plugin contract's version. 1: the first (formats, schemes, the load / map-names /
#: quantize / write / validate / infer hooks); 2: format options and outputs, runtime
#: sessions, scheme options and declared layouts, plugin-defined hookspecs; 3: commands
#: from plugins (``convcore_register_commands``). A plugin written to any earlier
#: version still loads (docs/plugins.md, "Compatibility").
CONTRACT = 3


@dataclass(frozen=True)
class Scheme:
    """A quantization scheme.

    :param name: the scheme name, e.g. ``"q4_0"``, ``"int4-g64"``, ``"int8-row"``.
    :param quantize: ``quantize(array, options) -> dict[str, ndarray]``: the packed
        payload in the scheme's canonical layout, from an f32/f16/bf16 array of any shape
        whose last axis is the row. ``options`` (may be empty; ignore keys you don't use):
        ``name`` (the tensor's name, for messages), ``weights`` (float32 importance of
        each column, shape ``(row_length,)``, for importance-aware searches), ``device``
        (where to compute, e.g. ``"cuda:0"``; absent means the CPU), ``absmax`` (the
        largest magnitude of the whole tensor when ``array`` is a piece of it, so a scheme
        with one scale per tensor gives the piece the tensor's scale: a writer streaming a
        tensor in pieces passes it), ``threads`` (the most threads the kernels may use).
    :param dequantize: ``dequantize(data, shape) -> float32 ndarray``.
    :param layout: ``layout(shape, dtype) -> {array_name: (dtype, packed_shape)}``: the
        arrays ``quantize`` returns for a tensor of logical ``shape`` and canonical input
        ``dtype`` (``"f32"``, ``"f16"``, ``"bf16"``), with canonical dtype names
        (``"u8"``, ``"u32"``, ``"f16"``, ...). The core checks every result against it.
    :param block_size: the row length must be a multiple of this.
    :param bits: bits per weight, scales included (for size estimates).
    :param family: ``"gguf"``, ``"affine"``, ``"row"``, ... (informational).
    :param tolerance: what ``convcore run --check`` holds an output quantized with this
        scheme to, on the bundled evaluation text: ``{"kl": largest mean KL(source‖output)
        in nats, "top1": smallest top-1 agreement}``; None: no default (the user gives
        ``--check-kl`` / ``--check-top1``).
    :param prepare: optional ``prepare(names, dtypes)``: make ready ahead of use what
        ``quantize`` and ``dequantize`` of the schemes ``names`` need for input of the
        canonical ``dtypes`` (compiling kernels, say). A writer that knows which schemes a
        conversion will use calls :meth:`Registry.prepare` once; schemes sharing one
        ``prepare`` get it called once with all their names, so a plugin can do the work
        side by side. Schemes work without it: whatever it would prepare is done on first use.
    :param dequantize_to: optional ``dequantize_to(data, shape, dtype) -> ndarray`` of the
        canonical float ``dtype``, bit for bit ``cast(dequantize(data, shape), dtype)``, made
        without the float32 array in between (a reader dequantizing to f16 uses it).
    """

    name: str
    quantize: Callable[[np.ndarray, dict[str, Any]], dict[str, np.ndarray]]
    dequantize: Callable[[dict[str, np.ndarray], tuple[int, ...]], np.ndarray]
    layout: Callable[[tuple[int, ...], str], LayoutSpec] | None = None
    block_size: int = 1
    bits: float = 0.0
    family: str = ""
    description: str = ""
    plugin: str = ""
    tolerance: dict[str, float] | None = field(default=None, hash=False, compare=False)
    prepare: Callable[[list[str], list[str]], None] | None = field(default=None, hash=False,
                                                                   compare=False)
    dequantize_to: Callable[[dict[str, np.ndarray], tuple[int, ...], str], np.ndarray] | None = \
        field(default=None, hash=False, compare=False)
    #: what a scheme written to contract 1 had adapted (reported by ``convcore plugins``)
    legacy: tuple[str, ...] = field(default=(), hash=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        notes = list(self.legacy)
        if self.layout is not None and not callable(self.layout):
            # contract 1's positional Scheme(name, quantize, dequantize, block_size, bits,
            # family, description): every value after dequantize sits one field late
            block = int(self.layout)
            if self.block_size != 1:   # bits (and maybe more) given positionally: shift them back
                bits, family, description = self.block_size, self.bits, self.family
                object.__setattr__(self, "bits", float(bits))
                object.__setattr__(self, "family", family if isinstance(family, str) else "")
                object.__setattr__(self, "description", description if isinstance(description, str) else "")
            object.__setattr__(self, "layout", None)
            object.__setattr__(self, "block_size", block)
            notes.append("block_size given in layout's place (contract 1's positional form): "
                         "pass block_size=, bits= by keyword")
        if _takes_one_argument(self.quantize):
            single = self.quantize
            object.__setattr__(self, "quantize", lambda array, options, _q=single: _q(array))
            notes.append("quantize(array) is contract 1: take quantize(array, options)")
        if self.layout is None and not any("layout" in n for n in notes):
            notes.append("no layout declared: its packed arrays go unchecked (pass layout=)")
        object.__setattr__(self, "legacy", tuple(dict.fromkeys(notes)))


def _takes_one_argument(fn: Callable[..., Any]) -> bool:
    """``fn`` accepts exactly one positional argument (contract 1's ``quantize(array)``)."""
    import inspect
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) == 1


@dataclass
class PluginInfo:
    name: str
    version: str = ""
    module: str = ""
    builtin: bool = False
    hooks: list[str] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)
    schemes: list[str] = field(default_factory=list)
    error: str = ""
    #: what of an older contract was adapted so the plugin loads (one line each)
    deprecations: list[str] = field(default_factory=list)


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


class Registry:
    """The plugin manager plus what plugins registered; one method per hook."""

    def __init__(self, load_entry_points: bool = True, plugins: tuple[Any, ...] = ()):
        self.pm = pluggy.PluginManager("convcore")
        self.pm.add_hookspecs(hookspecs)
        # historic: every plugin registered from here on may add hookspecs of its own
        self.pm.hook.convcore_add_hookspecs.call_historic(kwargs={"pluginmanager": self.pm})
        self.infos: dict[str, PluginInfo] = {}
        self.formats: dict[str, Format] = {}
        self.schemes: dict[str, Scheme] = {}
        # installed entry points not loaded: name -> (distribution, the variable that said so)
        self.skipped: dict[str, tuple[str, str]] = {}
        if os.environ.get("CONVCORE_TRACE_PLUGINS"):
            self._trace()
        for module_name in DEFAULT_PLUGINS:
            module = importlib.import_module(module_name)
            plugin = module.make_plugin(self) if hasattr(module, "make_plugin") else module
            self._add(plugin, module_name, builtin=True)
        if load_entry_points:
            self._load_entry_points()
        for plugin in plugins:
            name = getattr(plugin, "__name__", repr(plugin))
            self._add(plugin, name)
        self._check_pending()
        self._collect()

    # discovery ------------------------------------------------------------------
    def _check_pending(self) -> None:
        """``check_pending``, dropping (and reporting) each plugin that implements a hook
        nobody specified: a misspelled hookimpl, or a hook of a plugin that is absent."""
        while True:
            try:
                self.pm.check_pending()
                return
            except pluggy.PluginValidationError as exc:
                name = self.pm.get_name(exc.plugin)
                self.pm.unregister(exc.plugin)
                info = self.infos.get(name)
                if info is None:
                    raise
                first = (str(exc).strip().splitlines() or [""])[0]
                info.error = f"PluginValidationError: {first}"
                info.hooks = []

    def _add(self, plugin: Any, name: str, builtin: bool = False, version: str = "") -> None:
        disabled = _env_list("CONVCORE_DISABLE_PLUGINS") or []
        if name in disabled:
            return
        self.pm.register(plugin, name=name)
        self.infos[name] = PluginInfo(
            name=name,
            version=version,
            module=getattr(plugin, "__name__", ""),
            builtin=builtin,
            hooks=sorted(c.name for c in self.pm.get_hookcallers(plugin) or []),
        )

    def _load_entry_points(self) -> None:
        allowed = _env_list("CONVCORE_LOAD_PLUGINS")
        disabled = _env_list("CONVCORE_DISABLE_PLUGINS") or []
        seen: set[str] = set()
        for ep in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in seen:  # the same distribution found twice on sys.path
                continue
            seen.add(ep.name)
            if allowed is not None and ep.name not in allowed:
                self.skipped[ep.name] = (self._dist_name(ep), "CONVCORE_LOAD_PLUGINS")
                continue
            if ep.name in disabled:
                self.skipped[ep.name] = (self._dist_name(ep), "CONVCORE_DISABLE_PLUGINS")
                continue
            version = ep.dist.version if ep.dist else ""
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin is reported, not fatal
                first = (str(exc).strip().splitlines() or [""])[0]
                self.infos[ep.name] = PluginInfo(
                    name=ep.name, version=version, module=ep.value,
                    error=f"{type(exc).__name__}: {first}",
                )
                continue
            self._add(plugin, ep.name, version=version)

    @staticmethod
    def _dist_name(ep: Any) -> str:
        return ep.dist.name if getattr(ep, "dist", None) is not None else ep.value

    def _collect(self) -> None:
        for kind, hook, table in (
            ("format", self.pm.hook.convcore_register_formats, self.formats),
            ("scheme", self.pm.hook.convcore_register_schemes, self.schemes),
        ):
            for impl in reversed(hook.get_hookimpls()):
                plugin_name = impl.plugin_name

                def register(item: Any, _table=table, _kind=kind, _plugin=plugin_name) -> None:
                    if item.name in _table:
                        raise ConvcoreError(
                            f"{_kind} {item.name!r} is registered by both plugin "
                            f"{_table[item.name].plugin!r} and plugin {_plugin!r}"
                        )
                    item = type(item)(**{**item.__dict__, "plugin": _plugin})
                    _table[item.name] = item
                    info = self.infos.get(_plugin)
                    if info is not None:
                        getattr(info, _kind + "s").append(item.name)
                        for note in getattr(item, "legacy", ()):
                            line = f"{_kind} {item.name!r}: {note}"
                            info.deprecations.append(line)
                            warnings.warn(f"convcore plugin {_plugin!r}: {line}", DeprecationWarning,
                                          stacklevel=2)

                try:
                    impl.function(register=register)
                except ConvcoreError:
                    raise
                except Exception as exc:  # a plugin whose registration breaks is reported
                    info = self.infos.get(plugin_name)
                    if info is not None and not info.error:
                        first = (str(exc).strip().splitlines() or [""])[0]
                        info.error = f"{type(exc).__name__} in {hook.name}: {first}"

    def _trace(self) -> None:
        def before(hook_name: str, impls: list, kwargs: dict) -> None:
            print(f"[trace] {hook_name}({', '.join(kwargs)}) -> "
                  f"{[i.plugin_name for i in impls]}", file=sys.stderr)

        def after(outcome: Any, hook_name: str, impls: list, kwargs: dict) -> None:
            try:
                result = outcome.get_result()
            except BaseException as exc:  # noqa: BLE001 - tracing only
                result = f"raised {type(exc).__name__}"
            print(f"[trace] {hook_name} returned {type(result).__name__}", file=sys.stderr)

        self.pm.add_hookcall_monitoring(before, after)

    @property
    def hook(self) -> Any:
        """The plugin manager's hook relay, for hooks plugins add themselves
        (``registry.hook.myformat_register_archs(register=...)``)."""
        return self.pm.hook

    # lookups --------------------------------------------------------------------
    def format(self, name: str) -> Format:
        """The registered format ``name``, or an error listing the known ones."""
        try:
            return self.formats[name]
        except KeyError:
            known = ", ".join(sorted(self.formats)) or "none"
            raise ConvcoreError(f"unknown format {name!r} (known: {known}); "
                                f"{self._missing_plugin_hint(name)}") from None

    def scheme(self, name: str) -> Scheme:
        """The registered scheme ``name``, or an error saying which package provides it."""
        try:
            return self.schemes[name]
        except KeyError:
            pass
        listing = [f for f in self.formats.values() if name in f.schemes]
        packages = sorted({f.scheme_package for f in listing if f.scheme_package})
        if packages:
            raise ConvcoreError(f"no installed plugin provides quantization scheme {name!r}; "
                                f"format {listing[0].name} stores it with schemes from "
                                f"{packages[0]}: pip install {packages[0]}")
        raise ConvcoreError(f"unknown quantization scheme {name!r}: {self._missing_plugin_hint(name)}")

    def _missing_plugin_hint(self, name: str) -> str:
        """What to tell a user who asked for ``name`` that nothing registered: a plugin
        that failed to load, or where to look. The core knows no plugin by name."""
        broken = [i for i in self.infos.values() if i.error]
        for info in broken:
            if name in info.name or name in info.module:
                return f"plugin {info.name!r} is installed but failed to load: {info.error}"
        if broken:
            return (f"{len(broken)} installed plugin(s) failed to load "
                    f"({', '.join(i.name for i in broken)}); see convcore plugins")
        if self.skipped:
            shown = ", ".join(f"{dist} (by {why})" for dist, why in self.skipped.values())
            return f"installed plugins not loaded: {shown}"
        return ("no installed plugin provides it (the user guide lists the plugin "
                "distributions; convcore plugins shows what is installed)")

    def detect(self, path: Path) -> str:
        """Name of the readable format that claims ``path`` most strongly."""
        path = resolve(path)   # a hub id: its local snapshot
        if not path.exists():
            raise ConvcoreError(f"{path}: no such file or directory")
        scores = []
        for fmt in self.formats.values():
            if fmt.can_read and fmt.detect is not None:
                try:
                    score = int(fmt.detect(path) or 0)
                except Exception:  # noqa: BLE001 - a detector must not stop others
                    score = 0
                if score > 0:
                    scores.append((score, fmt.name))
        if not scores:
            raise ConvcoreError(f"{path}: no installed format recognises this path; pass --from")
        return max(scores)[1]

    # hooks ----------------------------------------------------------------------
    def load(self, path: Path, fmt: str | None = None, options: dict | None = None) -> Model:
        """Load ``path`` (format detected when ``fmt`` is None, a hub id fetched) lazily."""
        given = path
        path = resolve(path)   # a hub id: its local snapshot
        if not path.exists():
            raise ConvcoreError(f"{path}: no such file or directory")
        fmt = fmt or self.detect(path)
        if not self.format(fmt).can_read:
            raise ConvcoreError(f"format {fmt!r} cannot be read")
        with using(self):
            try:
                model = self.pm.hook.convcore_load(path=path, fmt=fmt, options=options or {})
            except (ConvcoreError, KeyboardInterrupt, SystemExit, MemoryError):
                raise
            except Exception as exc:  # a reader tripped on bytes it did not expect
                raise ConvcoreError(f"{path}: not a readable {fmt} model: {one_line(exc)}") from exc
        if model is None:
            raise ConvcoreError(f"{path}: no plugin loads format {fmt!r}")
        model.format = model.format or fmt
        model.source = model.source or str(path)
        if given != path and is_hub_id(given):   # named after the repository, not its snapshot
            model.metadata.setdefault("hub_id", str(given))
            model.metadata.setdefault("name", str(given).split("@")[0].split("/")[-1])
        return model

    def map_names(self, model: Model, target: str) -> dict[str, str]:
        """``{hf_name: name in target}`` merged from every plugin that knows ``target``."""
        merged: dict[str, str] = {}
        with using(self):
            results = self.pm.hook.convcore_map_names(model=model, target=target)
        for result in results:
            for k, v in (result or {}).items():
                merged.setdefault(k, v)
        return merged

    def prepare(self, schemes: Iterable[str], dtypes: Iterable[str] = FLOAT_SCHEMES) -> None:
        """Call the ``prepare`` of the registered ``schemes`` (see :class:`Scheme`), once per
        distinct callable with all its scheme names. Float types and unknown names are
        skipped: quantizing with them reports the error where it happens."""
        groups: dict[int, tuple[Callable, list[str]]] = {}
        for name in dict.fromkeys(schemes):
            sch = self.schemes.get(name)
            if sch is not None and sch.prepare is not None:
                groups.setdefault(id(sch.prepare), (sch.prepare, []))[1].append(name)
        kinds = sorted(set(dtypes))
        for prepare, names in groups.values():
            try:
                prepare(names, kinds)
            except ConvcoreError:
                raise
            except Exception as exc:  # a plugin's fault: one line naming it
                raise ConvcoreError(f"preparing schemes {', '.join(names)}: {one_line(exc)}") from exc

    def quantize(self, tensor: TensorRef | np.ndarray, scheme: str,
                 options: dict | None = None) -> QuantizedTensor:
        with using(self):
            result = self.pm.hook.convcore_quantize(tensor=tensor, scheme=scheme, options=options or {})
        if result is None:
            raise ConvcoreError(f"no plugin quantizes scheme {scheme!r}")
        return result

    def write(self, model: Model, path: Path, fmt: str, options: dict,
              progress: Callable[[str], None]) -> Path:
        with using(self):
            result = self.pm.hook.convcore_write(
                model=model, path=Path(path), fmt=fmt, options=options, progress=progress)
        if result is None:
            raise ConvcoreError(f"no plugin writes format {fmt!r}")
        return Path(result)

    def validate(self, path: Path, fmt: str | None = None) -> list[str]:
        path = resolve(path)
        fmt = fmt or self.detect(path)
        self.format(fmt)
        with using(self):
            try:
                results = self.pm.hook.convcore_validate(path=path, fmt=fmt)
            except (ConvcoreError, KeyboardInterrupt, SystemExit, MemoryError):
                raise
            except Exception as exc:  # a validator tripped on bytes it did not expect: one problem
                return [f"{path}: not a readable {fmt} model: {one_line(exc)}"]
        return [p for r in results if r for p in r]

    def open_session(self, path: Path, fmt: str | None = None,
                     options: dict | None = None) -> Session:
        """The model at ``path`` open in its format's runtime (close it, or use
        ``with``)."""
        path = resolve(path)   # a hub id: its local snapshot
        if not path.exists():
            raise ConvcoreError(f"{path}: no such file or directory")
        fmt = fmt or self.detect(path)
        self.format(fmt)
        with using(self):
            session = self.pm.hook.convcore_open_session(path=path, fmt=fmt, options=options or {})
        if session is None:
            raise ConvcoreError(f"no installed plugin runs format {fmt!r} in a runtime")
        if (options or {}).get("lora") and not getattr(session, "lora_applied", False):
            # a runtime that ignored the adapters would run the base model silently
            session.close()
            raise ConvcoreError(f"{path}: the {fmt} runtime cannot apply a LoRA adapter (--lora)")
        return session

    def infer(self, path: Path, token_ids: list[int], fmt: str | None = None) -> np.ndarray:
        """One-shot logits of ``token_ids`` from the model at ``path``."""
        path = Path(path)
        if not path.exists():
            raise ConvcoreError(f"{path}: no such file or directory")
        fmt = fmt or self.detect(path)
        with using(self):
            result = self.pm.hook.convcore_infer(path=path, fmt=fmt, token_ids=list(token_ids))
        if result is None:
            raise ConvcoreError(f"no installed plugin runs inference for format {fmt!r}")
        return np.asarray(result, dtype=np.float32)


_DEFAULT: Registry | None = None
_CURRENT: contextvars.ContextVar[Registry | None] = contextvars.ContextVar("convcore_registry", default=None)


def get_registry(refresh: bool = False) -> Registry:
    """The registry in use: the one a running conversion was given, else the
    process-wide one, built on first use."""
    global _DEFAULT
    current = _CURRENT.get()
    if current is not None and not refresh:
        return current
    if _DEFAULT is None or refresh:
        _DEFAULT = Registry()
    return _DEFAULT


@contextlib.contextmanager
def using(registry: Registry) -> Iterator[Registry]:
    """Make ``registry`` the one :func:`get_registry` returns inside the block."""
    token = _CURRENT.set(registry)
    try:
        yield registry
    finally:
        _CURRENT.reset(token)
