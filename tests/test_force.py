"""``--force`` replaces a previous output, never the user's own files or directories."""
from __future__ import annotations

import json

import pytest

import convcore
from convcore.testing import tree_digest


def user_tree(path):
    """A directory of the user's: a note, a sub-folder, and a config.json-lookalike."""
    path.mkdir()
    (path / "notes.md").write_text("my notes\n")
    (path / "sub").mkdir()
    (path / "sub" / "data.csv").write_text("a,b\n1,2\n")
    (path / "config.json").write_text("{}")
    return path


def refused(run_cli, *args, cwd_tree, message, env=None):
    """Run ``convcore run ARGS``; assert one error line with ``message`` and that
    ``cwd_tree`` (the folder holding the user's files) is byte-identical afterwards."""
    before = tree_digest(cwd_tree)
    result = run_cli("run", *args, env=env)
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr, result.stderr
    assert tree_digest(cwd_tree) == before
    return result


def test_force_refuses_a_directory_with_foreign_files(run_cli, src, tmp_path):
    dst = user_tree(tmp_path / "work")
    r = refused(run_cli, src, "-o", dst, "--to", "hf", "--force", cwd_tree=tmp_path,
                message="holds files convcore did not write (notes.md, sub/); choose another path")
    assert str(dst) in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "work"]


def test_python_api_follows_the_same_rules(src, tmp_path):
    dst = user_tree(tmp_path / "work")
    before = tree_digest(tmp_path)
    with pytest.raises(convcore.ConvcoreError, match="did not write"):
        convcore.convert(src, dst, to="hf", force=True)
    assert tree_digest(tmp_path) == before


def test_force_replaces_a_previous_output_atomically(run_cli, src, tmp_path):
    dst = tmp_path / "out"
    assert run_cli("run", src, "-o", dst, "--to", "hf", "-q").returncode == 0
    (dst / "README.md").write_text("model card\n")  # a companion file is replaceable too
    (dst / "1_Pooling").mkdir()
    (dst / "1_Pooling" / "config.json").write_text("{}")
    r = run_cli("run", src, "-o", dst, "--to", "hf", "--dtype", "f16", "--force", "-q")
    assert r.returncode == 0, r.stderr
    assert json.loads((dst / "config.json").read_text())["dtype"] == "float16"
    assert not (dst / "README.md").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_force_on_a_directory_in_place_of_a_file_format(run_cli, src, tmp_path):
    if "gguf" not in convcore.get_registry().formats:
        pytest.skip("conv-gguf not installed")
    dst = user_tree(tmp_path / "important")
    refused(run_cli, src, "-o", dst, "--to", "gguf", "--force", cwd_tree=tmp_path,
            message=f"{dst}: is a directory; a gguf output is a file")


def test_force_replaces_a_regular_file_for_a_file_format(run_cli, src, tmp_path):
    if "gguf" not in convcore.get_registry().formats:
        pytest.skip("conv-gguf not installed")
    dst = tmp_path / "m.gguf"
    dst.write_bytes(b"old output")
    r = run_cli("run", src, "-o", dst, "--to", "gguf", "--force", "-q")
    assert r.returncode == 0, r.stderr
    assert dst.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "src"]


def test_a_file_in_place_of_a_directory_format(run_cli, src, tmp_path):
    dst = tmp_path / "out"
    dst.write_text("a file of mine")
    refused(run_cli, src, "-o", dst, "--to", "hf", "--force", cwd_tree=tmp_path,
            message="exists and is not a directory")


@pytest.mark.parametrize("where", ["cwd", "home", "cwd-parent"])
def test_working_and_home_directories_are_never_outputs(run_cli, src, tmp_path, where):
    """``-o .`` / ``-o ~`` are refused even when they hold only model-like files."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "config.json").write_text("{}")
    inner = work / "inner"
    inner.mkdir()
    dst = {"cwd": ".", "home": str(work), "cwd-parent": ".."}[where]
    env = {"HOME": str(work)} if where == "home" else None
    cwd = {"cwd": work, "home": tmp_path, "cwd-parent": inner}[where]

    import os
    old = os.getcwd()
    os.chdir(cwd)
    try:
        message = {"cwd": "is the working directory", "home": "is the home directory",
                   "cwd-parent": "is an ancestor of the working directory"}[where]
        for force in ((), ("--force",)):
            refused(run_cli, src, "-o", dst, "--to", "hf", *force, cwd_tree=tmp_path,
                    message=message, env=env)
    finally:
        os.chdir(old)


def test_filesystem_root_and_source_relatives_are_never_outputs(run_cli, src, tmp_path):
    cases = [("/", "is a filesystem root"),
             (src, "is the source"),
             (tmp_path, "is an ancestor of the source"),
             (src / "out", "is inside the source")]
    for dst, message in cases:
        for force in ((), ("--force",)):
            refused(run_cli, src, "-o", dst, "--to", "hf", *force, cwd_tree=tmp_path,
                    message=message)


def test_a_symlinked_output_is_replaced_as_a_link(run_cli, src, tmp_path):
    """DST a link to the user's folder: the link is replaced, the folder left alone."""
    mine = user_tree(tmp_path / "mine")
    before = tree_digest(mine)
    link = tmp_path / "out"
    link.symlink_to(mine)
    r = run_cli("run", src, "-o", link, "--to", "hf", "--force", "-q")
    assert r.returncode == 0, r.stderr
    assert not link.is_symlink() and (link / "config.json").is_file()
    assert tree_digest(mine) == before



@pytest.mark.parametrize("kind", ["file", "directory"])
def test_the_final_move_never_replaces_what_appeared_meanwhile(tmp_path, kind):
    """Another conversion to the same DST finished between our last check and our move:
    the move refuses the existing name atomically (a hard link for files, a rename onto
    a non-empty directory), so its output stays whole and ours stays where it was."""
    from convcore.pipeline import _rename_no_replace

    ours, theirs = tmp_path / ".staging", tmp_path / "out"
    for path, text in ((ours, "ours"), (theirs, "theirs")):
        if kind == "file":
            path.write_text(text)
        else:
            path.mkdir()
            (path / "model.safetensors").write_text(text)
    with pytest.raises(convcore.ConvcoreError, match="out: already exists; pass --force"):
        _rename_no_replace(ours, theirs)
    read = (lambda p: p.read_text()) if kind == "file" else (lambda p: (p / "model.safetensors").read_text())
    assert read(theirs) == "theirs" and read(ours) == "ours"
    theirs_gone = tmp_path / "free"
    _rename_no_replace(ours, theirs_gone)
    assert read(theirs_gone) == "ours" and not ours.exists()


def test_two_conversions_to_one_destination(src, tmp_path):
    """Started together: one complete, valid output and one clear error, no leftovers."""
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-m", "convcore", "run", str(src), "-o", str(tmp_path / "out"),
                               "--to", "hf", "--dtype", "f16", "-q"], stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 1], results
    err = next(e for rc, e in results if rc == 1)
    assert err.strip().endswith("already exists; pass --force to overwrite") and err.count("\n") == 1
    assert not convcore.get_registry().validate(tmp_path / "out", "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary left
