"""Declared format options: what ``-O KEY=VALUE`` and the format flags may set.

A format lists its options (name, type, default, one-line help) when it registers; the
pipeline checks what a user passes against that list before any work starts, so a typo is
a one-line error naming the known options, never silently ignored.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

from .model import ConvcoreError

SIZE_UNITS = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}
OPTION_TYPES = ("str", "int", "float", "bool", "size", "choice")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_pairs(pairs: tuple[str, ...], what: str) -> dict[str, str]:
    """``("k=v", ...)`` as a dict; ``what`` names the option in the one-line error."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConvcoreError(f"{what} {pair!r} is not KEY=VALUE")
        key, value = pair.split("=", 1)
        out[key.strip()] = value
    return out


def parse_size(text: Any) -> int:
    """``"2G"``, ``"500M"``, ``"123"`` or an int -> bytes (decimal units, as llama.cpp's
    ``--split-max-size`` counts them)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConvcoreError(f"bad size {text!r}; expected e.g. 500M or 2G")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])


@dataclass(frozen=True)
class Option:
    """One option a format accepts.

    :param name: the key (``-O name=value``; flags such as ``--split-max-size`` set the
        option of the same name with ``-`` as ``_``).
    :param type: ``"str"``, ``"int"``, ``"float"``, ``"bool"``, ``"size"`` (``500M``,
        ``2G``: bytes) or ``"choice"`` (one of ``choices``).
    :param default: the value writers see when the user gives none (None: unset).
    :param help: one line for ``convcore formats FMT`` and the docs.
    :param choices: the allowed values of a ``"choice"`` option.
    """

    name: str
    type: str = "str"
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.type not in OPTION_TYPES:
            raise ValueError(f"option {self.name!r}: type must be one of {OPTION_TYPES}")

    def parse(self, value: Any, fmt: str) -> Any:
        """The typed value of ``value`` (a string from the command line or an already
        typed value from the Python API); a one-line error when it does not fit."""
        def bad(expected: str) -> ConvcoreError:
            return ConvcoreError(f"format {fmt}: option {self.name}={value!r} is not {expected}")

        kind = self.type
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise bad("a boolean (true/false)")
        if kind == "int":
            if isinstance(value, bool):
                raise bad("an integer")
            try:
                return int(str(value).strip(), 0) if isinstance(value, str) else int(value)
            except (TypeError, ValueError):
                raise bad("an integer") from None
        if kind == "float":
            try:
                return float(value)
            except (TypeError, ValueError):
                raise bad("a number") from None
        if kind == "size":
            try:
                return parse_size(value)
            except ConvcoreError:
                raise bad("a size such as 500M or 2G") from None
        if kind == "choice":
            if str(value) not in self.choices:
                raise bad(f"one of {', '.join(self.choices)}")
            return str(value)
        if not isinstance(value, str):
            raise bad("a string")
        return value

    def describe(self) -> dict[str, Any]:
        """The option as JSON-ready data (``convcore formats --json``)."""
        out: dict[str, Any] = {"name": self.name, "type": self.type, "default": self.default,
                               "help": self.help}
        if self.choices:
            out["choices"] = list(self.choices)
        return out


def check_options(fmt: str, declared: Iterable[Option], given: dict[str, Any],
                  what: str = "format") -> dict[str, Any]:
    """``given`` checked against ``declared``: typed values, defaults filled in. An
    unknown key is an error listing the known ones; ``what`` names the kind of thing
    whose options they are."""
    table = {o.name: o for o in declared}
    unknown = sorted(k for k in given if k not in table)
    if unknown:
        known = ", ".join(sorted(table)) or "none"
        raise ConvcoreError(f"{what} {fmt} has no option {unknown[0]!r} (its options: {known})")
    out = {name: o.default for name, o in table.items() if o.default is not None}
    for key, value in given.items():
        out[key] = table[key].parse(value, fmt)
    return out
