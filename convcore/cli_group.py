"""The ``convcore`` click group: the core's commands and those plugins add through
``convcore_register_commands`` (asked for once, when a command is first looked up)."""
from __future__ import annotations

from typing import Any, Callable

import click

from .model import ConvcoreError, one_line
from .registry import get_registry


class Interrupted(BaseException):
    """A KeyboardInterrupt (Ctrl-C) out of a command, re-raised as this so that click does
    not print a blank line before main's one ``error: interrupted`` line."""


def extra_providing(command: str) -> list[str]:
    """The distributions convcore's installed metadata lists for its extra named
    ``command`` (``convcore[serve]`` -> the plugin that adds ``serve``): where a missing
    plugin command comes from, from installed data, without the core naming any plugin."""
    from importlib import metadata
    try:
        requires = metadata.requires("convcore") or []
    except metadata.PackageNotFoundError:
        return []
    out = []
    for req in requires:
        spec, _, marker = req.partition(";")
        if f'extra == "{command}"' in marker.replace("'", '"'):
            out.append(spec.strip().split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip())
    return out


class _Group(click.Group):
    """The ``convcore`` group: the core's commands and those plugins add through
    ``convcore_register_commands``, asked for once, when a command is first looked up."""

    _plugins_asked = False

    def _plugin_commands(self) -> None:
        if self._plugins_asked:
            return
        self._plugins_asked = True
        core = set(self.commands)
        registry = get_registry()
        for impl in registry.pm.hook.convcore_register_commands.get_hookimpls():
            before = set(self.commands)
            added = _Adding(self, impl.plugin_name, core)
            try:
                impl.function(cli=added)
            except ConvcoreError:
                raise
            except Exception as exc:  # a plugin's bug: one line naming it, not a traceback
                raise ConvcoreError(f"plugin {impl.plugin_name!r} failed in convcore_register_commands: "
                                    f"{one_line(exc)}") from None
            for name in set(self.commands) - before:
                core.add(name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        self._plugin_commands()
        found = super().get_command(ctx, name)
        if found is None:
            dists = extra_providing(name)
            if dists:
                from importlib import metadata
                try:
                    metadata.distribution(dists[0])
                except metadata.PackageNotFoundError:
                    raise ConvcoreError(f"convcore {name} comes with the {dists[0]} plugin, which is not "
                                        f"installed: pip install {dists[0]} (or 'convcore[{name}]')") from None
                raise ConvcoreError(f"convcore {name} comes with the {dists[0]} plugin, which is installed "
                                    "but not loaded (disabled or failed: convcore plugins says which)")
        return found

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise Interrupted from None


class _Adding:
    """What a plugin's ``convcore_register_commands`` gets as ``cli``: the group, refusing
    a command name that is taken (one error naming both)."""

    def __init__(self, group: click.Group, plugin: str, taken: set[str]):
        self._group, self._plugin, self._taken = group, plugin, taken

    def add_command(self, command: click.Command, name: str | None = None) -> None:
        name = name or command.name
        if name in self._taken:
            raise ConvcoreError(f"plugin {self._plugin!r} adds command {name!r}, which convcore "
                                "or another plugin already has")
        self._group.add_command(command, name)

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], click.Command]:
        def decorate(fn: Callable[..., Any]) -> click.Command:
            cmd = click.command(*args, **kwargs)(fn)
            self.add_command(cmd)
            return cmd
        return decorate

    def group(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], click.Group]:
        def decorate(fn: Callable[..., Any]) -> click.Group:
            grp = click.group(*args, **kwargs)(fn)
            self.add_command(grp)
            return grp
        return decorate

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._group, attr)


