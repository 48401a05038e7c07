"""Fault safety of conversions: an interrupted or failed conversion leaves no DST, no
temporary (``.DST.convcore-XXXXXXXX``) and an unchanged source, and says so in one line.

Covered, with real conversions of the tiny llama (copied into tmp_path so that the source
digest check means something) to every installed format among hf, gguf (q8_0, q4_k_m),
mlx (int4-g64), parquet (int8-row), onnx (int4-b32) and npz (int8-row):

- SIGINT and SIGTERM at deterministic points: ``convcore.cli.main`` runs in-process under
  a ``sys.setprofile`` hook that counts call/return/c_return events in convcore's and the
  plugins' code and sends the signal to this process at the k-th one (the handler runs
  right there, inside the hook). The points come from an uninterrupted run's events: a
  few spread over the ``run`` command, the staging area's creation, the start, middle and
  end of the writer and of validation, every event of the final move/rename (the hard
  link and the rename of each file: a split gguf moves three) and the one after it; 19-29
  per format and signal. Afterwards: exit 130 with ``error: interrupted`` and nothing
  left, or (only once the move has begun) the whole output, valid. A signal that lands in
  a finalizer is dropped by CPython; the conversion then finishes normally. One real child
  process per signal.
- A full disk, as RLIMIT_FSIZE at 0, 4 KiB, half and just below the largest output file:
  exit 1 and one ``error: DST: cannot write ...: File too large`` line.
- A plugin writer that leaves files behind and raises RuntimeError, KeyboardInterrupt or
  ConvcoreError; and one that truncates a real output and returns normally (validation
  must refuse it).
- Two conversions to one gguf file (parquet without conv-gguf) at once: one output, one
  clear error (test_force.py has this for a directory format).
"""
from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

import convcore
from convcore.cli import Terminated, main
from convcore.testing import tree_digest

CASES = [("hf", None), ("gguf", "q8_0"), ("gguf", "q4_k_m"), ("mlx", "int4-g64"),
         ("parquet", "int8-row"), ("onnx", "int4-b32"), ("npz", "int8-row")]
SUFFIX = {"gguf": ".gguf", "parquet": ".parquet"}  # the file formats; the rest are directories
SIGNALS = [signal.SIGINT, signal.SIGTERM]


def case_id(case):
    return "-".join(p for p in case if p)


def needs(fmt):
    if fmt not in convcore.get_registry().formats:
        pytest.skip(f"format {fmt} not installed")


def run_args(src, dst, fmt, quant):
    return ["run", str(src), "-o", str(dst), "--to", fmt, "-q", *(["--quant", quant] if quant else [])]


def run_main(args, capsys, hook=None):
    """``convcore ARGS`` in this process (profiled by ``hook``): (exit status, stderr).
    Signal handlers and the profile hook are restored afterwards. An interrupt that Python
    dropped (raised in a finalizer) is recorded in ``hook.swallowed``."""
    capsys.readouterr()
    handlers = {s: signal.getsignal(s) for s in SIGNALS}
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where SIGINT is ignored
    unraisable = sys.unraisablehook
    swallowed = []
    sys.unraisablehook = lambda u: (swallowed.append(u) if issubclass(u.exc_type, (KeyboardInterrupt, Terminated))
                                    else unraisable(u))
    code = 0
    sys.setprofile(hook)
    try:
        main(args)
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.setprofile(None)
        sys.unraisablehook = unraisable
        for s, handler in handlers.items():
            signal.signal(s, handler)
    if hook is not None:
        hook.swallowed = swallowed
    return code, capsys.readouterr().err


def leftovers(tmp_path):
    return [p for p in tmp_path.rglob("*") if ".convcore-" in p.name]


def remove(path):
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


class Events:
    """Profile hook: counts call/return events (c_return too) in convcore's and the
    plugins' code; records them (``at`` None) or sends ``signum`` to this process at the
    ``at``-th one."""

    def __init__(self, at=None, signum=None):
        registry = convcore.get_registry()
        dirs = {Path(convcore.__file__).parent}
        dirs |= {Path(sys.modules[i.module].__file__).parent for i in registry.infos.values()
                 if i.module in sys.modules and getattr(sys.modules[i.module], "__file__", None)}
        self.roots = tuple(str(d) + os.sep for d in dirs)
        self.n, self.at, self.signum, self.seen = 0, at, signum, []

    def __call__(self, frame, event, arg):
        if event in ("call", "return", "c_return") and frame.f_code.co_filename.startswith(self.roots):
            self.n += 1
            if self.at is None:
                self.seen.append((event, frame.f_code.co_name, Path(frame.f_code.co_filename).name))
            elif self.n == self.at:
                os.kill(os.getpid(), self.signum)


def fault_points(seen, spread):
    """1-based event numbers to interrupt at: ``spread`` points over the ``run`` command,
    the staging area's creation, the start, middle and end of the writer and of validation,
    every event of the final move/rename, and the first after it. Also returns the number
    of the first event of the move (a complete DST may exist from there on)."""
    def first(event, name, file):
        return seen.index((event, name, file)) + 1

    def last(event, name, file):
        return len(seen) - seen[::-1].index((event, name, file))

    start, end = first("call", "run", "cli.py"), last("return", "run", "cli.py")
    w0, w1 = first("call", "write", "registry.py"), last("return", "write", "registry.py")
    v0, v1 = first("call", "validate", "registry.py"), last("return", "validate", "registry.py")
    m0, m1 = first("call", "_move_into_place", "pipeline.py"), last("return", "_move_into_place", "pipeline.py")
    assert start < w0 < w1 < v0 < v1 < m0 < m1 < end
    points = {start + (end - start) * k // (spread + 1) for k in range(1, spread + 1)}
    points |= {start, first("call", "_progress_bar", "pipeline.py"), w0, w0 + 1, (w0 + w1) // 2, w1,
               v0 + 1, (v0 + v1) // 2, v1, m1 + 1}
    points |= {k for k in range(m0, m1 + 1)
               if seen[k - 1][1] in ("_move_into_place", "_rename_no_replace")}
    return sorted(points), m0


COUNTED: dict = {}  # case -> the events of an uninterrupted conversion


# the default tier sends SIGINT at every point; SIGTERM (the same handler) in test-full
@pytest.mark.parametrize("signum", [SIGNALS[0], pytest.param(SIGNALS[1], marks=pytest.mark.full)],
                         ids=lambda s: signal.Signals(s).name)
@pytest.mark.parametrize("case", CASES + [("gguf", "q8_0", "--split-max-tensors", "10")], ids=case_id)
def test_a_signal_at_any_point_leaves_no_output(src, tmp_path, capsys, case, signum):
    fmt, quant, *extra = case
    needs(fmt)
    registry = convcore.get_registry()
    args = run_args(src, tmp_path / ("out" + SUFFIX.get(fmt, "")), fmt, quant) + extra
    before = tree_digest(src)

    def outputs():
        return sorted(p.name for p in tmp_path.iterdir() if p.name != "src")

    # an uninterrupted run first (the first in a process compiles and caches what later
    # ones use), then one that counts the events (once per case: SIGINT and SIGTERM share it)
    for hook in (None, None if case in COUNTED else Events()):
        code, err = run_main(args, capsys, hook)
        assert code == 0 and err.startswith("wrote "), err
        written, whole = Path(err[len("wrote "):-1]), outputs()  # several files for a split gguf
        assert registry.validate(written, fmt) == []
        for name in whole:
            remove(tmp_path / name)
        if hook is not None:
            COUNTED[case] = hook.seen
    seen = COUNTED[case]
    points, move_start = fault_points(seen, spread=4)
    completed = 0
    for k in points:
        hook = Events(at=k, signum=signum)
        code, err = run_main(args, capsys, hook)
        where = f"signal at event {k} of {len(seen)}: {seen[k - 1]}"
        if hook.swallowed:  # it landed in a finalizer (a generator closed as it was freed):
            # CPython drops exceptions there, so the conversion goes on and finishes
            assert (code, err) == (0, f"wrote {written}\n"), where
        else:
            assert (code, err) == (130, "error: interrupted\n"), where
        assert leftovers(tmp_path) == [], where
        assert tree_digest(src) == before, where
        if outputs():  # only once the output is in place, and then whole
            assert k >= move_start or hook.swallowed, where
            assert outputs() == whole and registry.validate(written, fmt) == [], where
            completed += 1
            for name in whole:
                remove(tmp_path / name)
    assert outputs() == []
    print(f"{case_id(case)} {signal.Signals(signum).name}: {len(points)} points of {len(seen)} events, "
          f"{completed} after the output was in place")


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_signal_to_a_child_process_leaves_no_output(src, tmp_path, signum):
    """Ctrl-C (SIGINT) or SIGTERM to a real ``convcore run`` midway: one line, exit 130,
    nothing left."""
    code = ("import sys, time, convcore.pipeline as p\n"
            "orig = p._progress_bar\n"
            "def slow(total, enabled, desc):\n"
            "    adv, close = orig(total, False, desc)\n"
            "    return (lambda name: (time.sleep(0.3), adv(name))), close\n"
            "p._progress_bar = slow\n"
            "from convcore.cli import main\n"
            "main(sys.argv[1:])\n")
    before = tree_digest(src)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", code, *run_args(src, out, "hf", None)],
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(".out.convcore-") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (130, "error: interrupted\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert tree_digest(src) == before


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_a_full_disk_is_one_error_naming_the_destination(src, tmp_path, capsys, case):
    """RLIMIT_FSIZE stands in for a full disk (CPython ignores SIGXFSZ, so writes past the
    limit raise OSError EFBIG)."""
    fmt, quant = case
    needs(fmt)
    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
    dst = tmp_path / ("out" + SUFFIX.get(fmt, ""))
    args = run_args(src, dst, fmt, quant)
    before = tree_digest(src)
    assert run_main(args, capsys)[0] == 0
    largest = max(p.stat().st_size for p in ([dst] if dst.is_file() else dst.rglob("*")) if p.is_file())
    remove(dst)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    for limit in (0, 4096, largest // 2, largest - 1):
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            code, err = run_main(args, capsys)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        assert code == 1 and err.count("\n") == 1 and ".convcore-" not in err, (limit, err)
        # "cannot write the output: File too large", or a plugin's own words for it; never
        # a short file left for validation to find (ndarray.tofile drops a failed flush)
        assert err.startswith(f"error: {dst}: cannot write ") and "File too large" in err, (limit, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["src"], limit
        assert tree_digest(src) == before


# a plugin whose writer fails --------------------------------------------------------------
def faulty_plugin(exc):
    """A plugin with a directory format ``faultydir`` and a file format ``faultyfile``
    whose writer leaves a few files in its target (and a sibling shard) and raises ``exc``."""
    def register_formats(register):
        register(convcore.Format(name="faultydir", directory=True, can_read=False))
        register(convcore.Format(name="faultyfile", extensions=(".fty",), can_read=False))

    def write(model, path, fmt, options):
        if fmt == "faultydir":
            path.mkdir()
            (path / "config.json").write_text("{}")
            (path / "model.bin").write_bytes(b"\0" * 1000)
        elif fmt == "faultyfile":
            path.write_bytes(b"\0" * 1000)
            path.with_name(path.stem + "-00002-of-00002.fty").write_bytes(b"\0" * 10)
        else:
            return None
        raise exc

    module = types.ModuleType("faulty")
    module.convcore_register_formats = convcore.hookimpl(register_formats)
    module.convcore_write = convcore.hookimpl(write)
    return module


@pytest.mark.parametrize("fmt", ["faultydir", "faultyfile"])
@pytest.mark.parametrize("exc, expected", [
    (RuntimeError("disk on fire\nmore detail"),
     (1, "error: {dst}: the {fmt} writer (plugin faulty) failed: RuntimeError: disk on fire\n")),
    (KeyboardInterrupt(), (130, "error: interrupted\n")),
    (convcore.ConvcoreError("model.bin: tensor x is too wide"), (1, "error: model.bin: tensor x is too wide\n")),
], ids=["RuntimeError", "KeyboardInterrupt", "ConvcoreError"])
def test_a_failing_writer_leaves_no_output(src, tmp_path, capsys, fmt, exc, expected):
    registry = convcore.Registry(load_entry_points=False, plugins=(faulty_plugin(exc),))
    dst = tmp_path / ("out.fty" if fmt == "faultyfile" else "out")
    before = tree_digest(src)
    with convcore.using(registry):
        code, err = run_main(["run", str(src), "-o", str(dst), "--to", fmt, "-q"], capsys)
    assert (code, err) == (expected[0], expected[1].format(dst=dst, fmt=fmt))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert tree_digest(src) == before
    if not isinstance(exc, KeyboardInterrupt):  # the Python API raises the same message
        with pytest.raises(convcore.ConvcoreError) as info:
            convcore.convert(src, dst, to=fmt, registry=registry)
        assert f"error: {info.value}\n" == err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.fixture(scope="module")
def truncating_registry():
    """The installed plugins plus one that runs the real writer and then cuts the largest
    file it wrote to half its size, returning normally."""
    module = types.ModuleType("truncating")
    holder = {}

    def write(model, path, fmt, options, progress):
        real = holder["registry"].pm.subset_hook_caller("convcore_write", remove_plugins=[module])
        written = real(model=model, path=path, fmt=fmt, options=options, progress=progress)
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        largest = max(files, key=lambda p: p.stat().st_size)
        with open(largest, "r+b") as f:
            f.truncate(largest.stat().st_size // 2)
        return written

    module.convcore_write = convcore.hookimpl(tryfirst=True)(write)
    holder["registry"] = convcore.Registry(plugins=(module,))
    return holder["registry"]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_a_truncated_output_is_refused_by_validation(src, tmp_path, capsys, case, truncating_registry):
    fmt, quant = case
    needs(fmt)
    dst = tmp_path / ("out" + SUFFIX.get(fmt, ""))
    before = tree_digest(src)
    with convcore.using(truncating_registry):
        code, err = run_main(run_args(src, dst, fmt, quant), capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"error: {dst}: written output fails validation: ") and ".convcore-" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert tree_digest(src) == before


def test_two_conversions_to_one_file(src, tmp_path):
    """Started together: one complete, valid output and one clear error, no leftovers
    (test_force.py has this for a directory format)."""
    formats = convcore.get_registry().formats
    fmt, quant = next(((f, q) for f, q in (("gguf", "q8_0"), ("parquet", "int8-row")) if f in formats),
                      (None, None))
    if fmt is None:
        pytest.skip("neither gguf nor parquet installed")
    dst = tmp_path / f"out{SUFFIX[fmt]}"
    procs = [subprocess.Popen([sys.executable, "-m", "convcore", *run_args(src, dst, fmt, quant)],
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 1], results
    err = next(e for rc, e in results if rc == 1)
    assert err == f"error: {dst}: already exists; pass --force to overwrite\n"
    assert convcore.get_registry().validate(dst, fmt) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out" + SUFFIX[fmt], "src"]
