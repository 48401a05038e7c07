"""Registration hooks plugins add for each other (through ``convcore_add_hookspecs``).

A plugin that lets others extend it (say, a format plugin's architecture table) adds a
hook such as ``myformat_register_archs(register)`` and reads what every plugin passed to
``register`` with :func:`collect_registrations`. The result is kept per registry object,
so a registry built later (other plugins, other allow-lists) never sees a stale table.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

from .model import ConvcoreError


@dataclass(frozen=True)
class Registrations:
    """What plugins registered through one hook, in call order.

    :param items: key -> the registered object.
    :param plugins: key -> name of the plugin that registered it (for error messages).
    """

    items: dict[str, Any] = field(default_factory=dict)
    plugins: dict[str, str] = field(default_factory=dict)


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# two writer threads may ask at once; collecting twice would call plugins twice
_LOCK = threading.Lock()


def collect_registrations(hook_name: str, key: Callable[[Any], str], what: str, *,
                          kind: type | None = None, registry: Any = None,
                          extra: dict[str, Any] | None = None) -> Registrations:
    """Call every implementation of the registration hook ``hook_name`` with a
    ``register`` callback and return what was registered, keyed by ``key(item)``.

    Computed once per registry (``registry`` defaults to :func:`convcore.get_registry`).
    Errors are one line: a key registered twice names both plugins; an object that is not
    a ``kind`` names the plugin; a hook that raises names the plugin and the error.

    :param hook_name: the hook, e.g. ``"myformat_register_archs"``.
    :param key: the name an item is registered under, e.g. ``lambda a: a.model_type``.
    :param what: what an item is, for messages (``"gguf architecture"``).
    :param kind: the class every registered item must be an instance of.
    :param registry: the :class:`convcore.Registry` whose plugins to ask.
    :param extra: other arguments of the hook, by name (an implementation gets those it
        names; every other argument it names is the ``register`` callback).
    """
    if registry is None:
        from .registry import get_registry
        registry = get_registry()
    with _LOCK:
        per_registry = _CACHE.setdefault(registry, {})
        if hook_name not in per_registry:
            per_registry[hook_name] = _collect(registry, hook_name, key, what, kind, extra or {})
        return per_registry[hook_name]


def _collect(registry: Any, hook_name: str, key: Callable[[Any], str], what: str,
             kind: type | None, extra: dict[str, Any]) -> Registrations:
    hook = getattr(registry.hook, hook_name, None)
    if hook is None or not hook.has_spec():
        raise ConvcoreError(f"no installed plugin defines the hook {hook_name!r}; "
                            "is the plugin that adds it installed and enabled?")
    out = Registrations()
    # reversed: the order pluggy calls them in (last registered first), as the core's
    # own format and scheme registration does
    for impl in reversed(hook.get_hookimpls()):
        plugin = impl.plugin_name

        def register(item: Any, _plugin: str = plugin) -> None:
            if kind is not None and not isinstance(item, kind):
                raise ConvcoreError(f"plugin {_plugin!r} passed a {type(item).__name__} to "
                                    f"{hook_name}'s register, expected a {kind.__name__}")
            name = key(item)
            if name in out.items:
                raise ConvcoreError(f"{what} {name!r} is registered by both plugin "
                                    f"{out.plugins[name]!r} and plugin {_plugin!r}")
            out.items[name] = item
            out.plugins[name] = _plugin

        try:
            impl.function(**{arg: extra.get(arg, register) for arg in impl.argnames})
        except ConvcoreError:
            raise
        except Exception as exc:  # a third party's bug is reported as a line, not a traceback
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ConvcoreError(f"plugin {plugin!r} failed in {hook_name}: "
                                f"{type(exc).__name__}: {first}") from None
    return out
