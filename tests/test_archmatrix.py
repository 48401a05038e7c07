"""The architecture matrix: built from the installed formats' declarations, shown in
docs/architectures.md exactly as ``convcore formats --archs`` prints it."""
from __future__ import annotations

import json
from pathlib import Path

import convcore
from convcore.archmatrix import markdown, matrix

DOC = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"


def test_docs_show_the_command_output(run_cli):
    shown = run_cli("formats", "--archs")
    assert shown.returncode == 0, shown.stderr
    table = shown.stdout
    assert table.startswith("| architecture | hf |")
    assert table in DOC.read_text(), "docs/architectures.md is stale: regenerate its table"


def test_matrix_cells(run_cli):
    data = json.loads(run_cli("formats", "--archs", "--json").stdout)
    archs = data["archs"]
    assert archs["mixtral"]["gguf"] == {"write": True, "read": True, "checked": True, "note": "as llama"}
    assert archs["qwen3_moe"]["mlx"]["checked"] and archs["gemma3_text"]["onnx"]["note"] == "builder"
    assert archs["gemma3"]["gguf"]["note"].startswith("language model only")
    assert archs["llama"]["parquet"] == {"any": True}   # a format that declares nothing
    assert archs["llama"]["hf"] == {"any": True}


def test_matrix_says_what_a_format_does_not_convert():
    """mlx-lm has no BERT here: its cell is missing and prints as "-"; every declared
    architecture has a row, the image-text ones too."""
    table = matrix(convcore.get_registry())
    assert set(table["formats"]) >= {"hf", "gguf", "mlx", "onnx"}
    assert "mlx" not in table["archs"]["bert"]
    row = next(line for line in markdown(table).splitlines() if line.startswith("| bert |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[table["formats"].index("mlx") + 1] == "-"
    assert {"mixtral", "qwen2_moe", "qwen3_moe", "gemma3", "mistral3", "llava"} <= set(table["archs"])
