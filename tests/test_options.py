"""Declared format options: typed, defaulted, listed, and an unknown key is an error."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import convcore

ROOT = Path(__file__).resolve().parents[1]


def one_error_line(result, message):
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr, result.stderr


def test_unknown_option_is_refused_naming_the_known_ones(run_cli, tiny_llama, tmp_path):
    r = run_cli("run", tiny_llama, "-o", tmp_path / "o", "--to", "hf", "-O", "no_such_option=1")
    one_error_line(r, "format hf has no option 'no_such_option' (its options: dry_run, split_max_size)")
    assert not (tmp_path / "o").exists()


def test_a_format_flag_the_target_does_not_declare(run_cli, tiny_llama, tmp_path):
    r = run_cli("run", tiny_llama, "-o", tmp_path / "o", "--to", "hf", "--vocab-only")
    one_error_line(r, "format hf has no option 'vocab_only'")


def test_ill_typed_option(run_cli, tiny_llama, tmp_path):
    r = run_cli("run", tiny_llama, "-o", tmp_path / "o", "--to", "hf", "--split-max-size", "lots")
    one_error_line(r, "format hf: option split_max_size='lots' is not a size such as 500M or 2G")
    r = run_cli("run", tiny_llama, "-o", tmp_path / "o", "--to", "hf", "-O", "dry_run=maybe")
    one_error_line(r, "option dry_run='maybe' is not a boolean")


def test_options_reach_the_writer_typed(tiny_llama, tmp_path):
    out = convcore.convert(tiny_llama, tmp_path / "o", to="hf", options={"split_max_size": "1M"})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


def test_option_parsing():
    opt = convcore.Option("n", "int", 3, "a count")
    assert opt.parse("0x10", "f") == 16 and opt.parse(7, "f") == 7
    with pytest.raises(convcore.ConvcoreError, match="is not an integer"):
        opt.parse(True, "f")
    choice = convcore.Option("c", "choice", "a", "pick", choices=("a", "b"))
    with pytest.raises(convcore.ConvcoreError, match="is not one of a, b"):
        choice.parse("z", "f")
    assert convcore.Option("s", "size").parse("2G", "f") == 2_000_000_000
    with pytest.raises(ValueError):
        convcore.Option("x", "colour")


def test_formats_lists_options(run_cli):
    r = run_cli("formats", "hf", "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)
    assert {o["name"] for o in row["options"]} == {"split_max_size", "dry_run"}
    text = run_cli("formats", "hf").stdout
    assert "split_max_size=size (default 5000000000)" in text


def test_guide_table_matches_the_declarations():
    """docs/guide.md's per-format table lists exactly the options each format declares."""
    guide = (ROOT / "docs" / "guide.md").read_text()
    rows: dict[str, set[str]] = {}
    for line in guide.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[1] in ("directory", "file"):
            rows[cells[0]] = set(re.findall(r"`(\w+)`", cells[3]))
    registry = convcore.get_registry()
    for name, fmt in registry.formats.items():
        if fmt.can_write:
            assert name in rows, f"docs/guide.md has no row for format {name}"
            assert rows[name] == {o.name for o in fmt.options}, name
