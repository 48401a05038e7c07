"""Which architectures convert to which formats: the table ``convcore formats --archs``
prints, built from what each installed format declares (:attr:`Format.architectures`,
from the plugin's own architecture tables), plus the image-text checkpoints whose
language model those formats take (:mod:`convcore.multimodal`)."""
from __future__ import annotations

from typing import Any

from .multimodal import IMAGE_TEXT

#: the text family each image-text checkpoint's language model converts as
TEXT_OF = {"gemma3": "gemma3_text", "mistral3": "mistral", "llava": "llama"}


#: sources read over another model or made up: never converted on their own account
ADAPTER_SOURCES = ("peft", "mlx-adapter", "fake")


def matrix(registry: Any) -> dict[str, Any]:
    """``{"formats": [...], "archs": {model_type: {format: cell}}}``; a cell is the
    format's declaration (``write``, ``read``, ``checked``, ``note``) or ``{"any": True}``
    for formats that store any architecture."""
    formats = sorted((f for f in registry.formats.values() if f.name not in ADAPTER_SOURCES),
                     key=lambda f: (f.name != "hf", f.name))
    declared = {f.name: f.architectures() for f in formats if f.architectures is not None}
    archs: dict[str, dict[str, Any]] = {}
    for name, table in declared.items():
        for arch, cell in table.items():
            archs.setdefault(arch, {})[name] = dict(cell)
    for family in IMAGE_TEXT:
        row = archs.setdefault(family, {})
        for name, table in declared.items():
            text = table.get(TEXT_OF[family])
            if text and text.get("write"):
                row[name] = {**text, "read": False, "note": f"language model only, as {TEXT_OF[family]}"}
    for row in archs.values():
        for f in formats:
            if f.name not in declared:
                row.setdefault(f.name, {"any": True})
    return {"formats": [f.name for f in formats], "archs": dict(sorted(archs.items()))}


def cell_text(cell: dict[str, Any] | None) -> str:
    """``rw+`` = written, read back, checked in the runtime by the plugin's tests; ``any``
    = a weight store that takes every architecture; ``-`` = not converted."""
    if not cell:
        return "-"
    if cell.get("any"):
        return "any"
    text = ("w" if cell.get("write") else "") + ("r" if cell.get("read") else "")
    text = (text or "-") + ("+" if cell.get("checked") else "")
    return text + (f" ({cell['note']})" if cell.get("note") else "")


def markdown(table: dict[str, Any]) -> str:
    """The matrix as a Markdown table (what docs/architectures.md shows)."""
    head = ["architecture", *table["formats"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arch, row in table["archs"].items():
        lines.append("| " + " | ".join([arch, *(cell_text(row.get(f)) for f in table["formats"])]) + " |")
    return "\n".join(lines) + "\n"
