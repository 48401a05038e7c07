"""Property-based fuzzing end to end, and generated headers for the readers that had only
mutated ones (hardening issue; docs/reliability.md).

1. **End to end under an address-space limit.** Real tiny outputs of every readable
   format (hf safetensors and ``pytorch_model.bin`` dirs, a GGUF, a split GGUF, mlx, npz,
   onnx, parquet) are mutated by hypothesis (truncation, flipped bytes, 8-byte ints set
   huge or negative, spliced bytes, for a split GGUF also a missing shard) and written to
   disk here; ONE worker process (``python -m convcore.testing.fuzzworker``) then runs
   ``convcore inspect``, ``validate`` and ``run -o DST --to hf --dtype f16`` /
   ``--to gguf --quant q8_0`` on each, in-process, with ``RLIMIT_AS`` set to its virtual
   size plus ``E2E_HEADROOM`` and a 60 s alarm per command. Every command must exit 0 or
   1; exit 1 means exactly one ``error: `` line (``validate``: ``invalid: `` lines, one per
   problem); no traceback, no MemoryError, no exception that the CLI had to catch as an
   unexpected one (its ``rerun with --debug`` line), no hang, resident memory within
   ``E2E_RSS_SLACK`` of the worker's; a ``run`` that exits 0 wrote an output that
   validates. The unmutated originals are cases too and must exit 0 throughout.
2. **Generated headers**, in-process like tests/test_fuzz_headers.py (``registry.load``,
   every tensor read, and ``registry.validate``; only a one-line ConvcoreError may come
   out): split GGUF metadata (``split.no``/``split.count``/``split.tensors.count`` values,
   shard names that disagree, a missing shard), the npz manifest and its ``.npy`` member
   headers (any ``descr``/``shape``/``fortran_order``, object dtypes that would need
   pickle), parquet tables with the right column names but wrong types and values, onnx
   TensorProtos (dims, data_type, raw_data, external-data location/offset/length) and mlx
   config.json quantization fields and index ``weight_map`` values.

Bounded by ``CONVCORE_FUZZ_EXAMPLES`` as tests/test_fuzz_headers.py is (default 150): the
end-to-end part takes a tenth of it per input kind (15; ``make fuzz``: 500, run by one
worker per ``E2E_BATCH`` cases, each batch's inputs deleted after it), the generated
headers a fifth per loader (30; ``make fuzz``: 1000), split GGUF a fifteenth (10; 333).
``CONVCORE_FUZZ_VERBOSE=1`` (with ``-s``) prints what each loader made of its inputs.
"""
from __future__ import annotations

import ast
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import convcore  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("CONVCORE_FUZZ_EXAMPLES", "150"))
E2E_CASES = max(4, FUZZ_EXAMPLES // 10)
GEN_EXAMPLES = max(10, FUZZ_EXAMPLES // 5)
#: a split GGUF's every tensor is dequantized per example: fewer keep it as quick
SPLIT_EXAMPLES = max(10, FUZZ_EXAMPLES // 15)
FUZZ = settings(max_examples=GEN_EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
#: address space the worker may add to what it had after warming up: a good input needs
#: well under 128 MiB more (measured), a header-declared allocation of a GiB fails
E2E_HEADROOM = (1 << 30)
#: resident memory a case may add to the worker's, besides 16x its own size
E2E_RSS_SLACK = 256 << 20
ALARM_S = 60
RUNS = [["--to", "hf", "--dtype", "f16"], ["--to", "gguf", "--quant", "q8_0"]]
_TARGETS = {"mlx": "int4-g64", "parquet": "int8-row", "npz": "int8-row", "onnx": "int4-b32",
            "gguf": "q8_0"}
HUGE_INTS = [-1, -2**31, 2**31, 2**32 - 1, 2**40, 2**62, 2**63 - 1, -2**63]

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=True), st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
big_ints = st.one_of(st.integers(-3, 64), st.sampled_from(HUGE_INTS), st.integers(-2**70, 2**70))
shapes = st.one_of(st.lists(big_ints, max_size=4), json_values)


# the good inputs ------------------------------------------------------------------------
_GOOD: dict[str, Path] = {}


def good_inputs() -> dict[str, Path]:
    """Every readable kind of input, made once per session from the tiny llama: the path
    a user would pass (a split GGUF: its first shard)."""
    if not _GOOD:
        from convcore.testing.models import tiny_model

        formats = convcore.get_registry().formats
        root = Path(tempfile.mkdtemp(prefix="fuzz-e2e-good-"))
        src = tiny_model("llama")
        _GOOD["hf"] = src
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
            _GOOD["hf-bin"] = tiny_model("llama", bin=True)
        except ImportError:
            pass
        for fmt, quant in _TARGETS.items():
            if fmt in formats:
                out = root / {"parquet": "m.parquet", "gguf": "m.gguf"}.get(fmt, fmt)
                convcore.convert(src, out, to=fmt, quant=quant)
                _GOOD[fmt] = out
        if "gguf" in formats:
            split = root / "split"
            split.mkdir()
            convcore.convert(src, split / "m.gguf", to="gguf", quant="q8_0",
                             options={"split_max_tensors": 8})
            shards = sorted(split.glob("m-*-of-*.gguf"))
            assert len(shards) >= 2, shards
            _GOOD["gguf-split"] = shards[0]
    return _GOOD


def good(kind: str) -> Path:
    inputs = good_inputs()
    if kind not in inputs:
        pytest.skip(f"no {kind} input (plugin or torch missing)")
    return inputs[kind]


def copy_input(src: Path, dest_dir: Path, link: bool = False) -> Path:
    """``src`` (a file, a dir, or the first shard of a split GGUF with its siblings)
    copied into ``dest_dir`` (hard-linked with ``link``: then replace a file, never write
    into it); the path to pass to the CLI."""
    dest_dir.mkdir(parents=True, exist_ok=True)

    def copy(a, b):  # onnx's checker refuses hard-linked external data: those are copied
        return os.link(a, b) if link and not str(a).endswith(".data") else shutil.copy(a, b)

    if src.is_dir():
        shutil.copytree(src, dest_dir / src.name, copy_function=copy)
        return dest_dir / src.name
    for sibling in (sorted(src.parent.glob("m-*-of-*.gguf")) if "-of-" in src.name else [src]):
        copy(sibling, dest_dir / sibling.name)
    return dest_dir / src.name


def data_files(case: Path) -> list[Path]:
    """The files of an input that fuzzing may damage: weights, headers, configs."""
    if case.is_file():
        return sorted(case.parent.iterdir())
    return sorted(p for p in case.rglob("*") if p.is_file() and p.name not in
                  ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "genai_config.json"))


# 1. end to end --------------------------------------------------------------------------
E2E_KINDS = ["hf", "hf-bin", "gguf", "gguf-split", "mlx", "npz", "onnx", "parquet"]


def mutate(data: st.DataObject, case: Path) -> str:
    """Damage one file of ``case`` in place; a short description of what was done."""
    files = data_files(case)
    if "-of-" in case.name and data.draw(st.integers(0, 9)) == 0:
        victim = data.draw(st.sampled_from(files))
        victim.unlink()
        return f"removed {victim.name}"
    victim = data.draw(st.sampled_from(files))
    raw = bytearray(victim.read_bytes())
    head = max(1, min(len(raw), 1 << 16))  # headers, manifests, footers sit near an end
    action = data.draw(st.sampled_from(["truncate", "flip", "flip", "int", "splice"]))
    if action == "truncate" or not raw:
        raw = raw[:data.draw(st.integers(0, max(0, len(raw) - 1)))]
    elif action == "flip":
        tail = data.draw(st.booleans())  # parquet's footer and zip's directory are at the end
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, head - 1))
            raw[len(raw) - 1 - i if tail else i] = data.draw(st.integers(0, 255))
    elif action == "int":
        i = data.draw(st.integers(0, max(0, min(len(raw), head) - 8)))
        if data.draw(st.booleans()):
            i = max(0, len(raw) - 8 - i)
        raw[i:i + 8] = struct.pack("<q", data.draw(st.sampled_from(HUGE_INTS)))
    else:
        i = data.draw(st.integers(0, len(raw)))
        raw[i:i] = data.draw(st.binary(min_size=1, max_size=64))
    victim.unlink()  # a hard link to the good input: replaced, not written into
    victim.write_bytes(bytes(raw))
    return f"{action} {victim.name}"


def make_cases(kind: str, root: Path) -> list[dict]:
    """The unmutated input of ``kind``, then ``E2E_CASES`` hypothesis-mutated copies."""
    src = good_inputs()[kind]
    path = copy_input(src, root / f"{kind}-good", link=True)
    cases = [{"id": f"{kind}-good", "kind": kind, "path": str(path), "what": "unmutated",
              "size": size_of(path)}]
    made: list[dict] = []
    attempt = iter(range(10**9))

    @settings(FUZZ, max_examples=E2E_CASES)
    @given(data=st.data())
    def gen(data):
        case_id = f"{kind}-{next(attempt)}"
        path = copy_input(src, root / case_id, link=True)
        what = mutate(data, path)
        made.append({"id": case_id, "kind": kind, "path": str(path), "what": what, "size": size_of(path)})

    gen()
    return cases + made


def size_of(path: Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file())


def run_worker(cases: list[dict], root: Path) -> tuple[dict, dict]:
    """All ``cases`` in ONE worker process: (its header line, results by case id)."""
    root.mkdir(parents=True)
    out = root / "out"
    out.mkdir()
    biggest = max(size_of(p) for p in good_inputs().values())
    job = {"cases": cases, "runs": RUNS, "out": str(out), "results": str(root / "results.jsonl"),
           "headroom": E2E_HEADROOM + 16 * biggest, "alarm": ALARM_S,
           "warmup": [str(p) for p in good_inputs().values()]}
    (root / "job.json").write_text(json.dumps(job))
    # the alarm cannot stop a loop inside C code: a whole-worker limit backs it up (a
    # good case takes well under a second)
    try:
        proc = subprocess.run([sys.executable, "-m", "convcore.testing.fuzzworker", str(root / "job.json")],
                              capture_output=True, text=True, timeout=300 + 5 * len(cases))
        code, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, stderr = "timeout", str(exc.stderr or "")
    results_file = root / "results.jsonl"
    lines = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    started = [r["start"] for r in lines if "start" in r]
    results = {r["id"]: r for r in lines if "cmds" in r}
    crashed = started[-1] if started and started[-1] not in results else None
    assert code == 0 and crashed is None, (
        f"worker exit {code} during case {crashed} "
        f"({next((c for c in cases if c['id'] == crashed), None)}): {stderr[-3000:]}")
    worker = next(r for r in lines if r.get("worker"))
    for r in results.values():
        r["base_rss"] = worker["base_rss"]
    return worker, results


#: cases one worker takes: all of them at the default setting; ``make fuzz`` runs a few
#: workers, deleting each batch's inputs after it (disk)
E2E_BATCH = 400


@pytest.fixture(scope="module")
def e2e(tmp_path_factory) -> dict:
    """Make the cases, run them in as few workers as E2E_BATCH allows (one by default),
    and return every result by case id."""
    root = tmp_path_factory.mktemp("fuzz-e2e")
    kinds = [k for k in E2E_KINDS if k in good_inputs()]
    every: list[dict] = []
    results: dict = {}
    workers: list[dict] = []
    batch: list[dict] = []
    for i, kind in enumerate(kinds):
        batch += make_cases(kind, root / f"cases{len(workers)}")
        if len(batch) >= E2E_BATCH or i == len(kinds) - 1:
            worker, done = run_worker(batch, root / f"worker{len(workers)}")
            workers.append(worker)
            results.update(done)
            every += batch
            batch = []
            shutil.rmtree(root / f"cases{len(workers) - 1}", ignore_errors=True)
    return {"cases": every, "results": results, "workers": workers}


def problems_of(case: dict, result: dict) -> list[str]:
    """Everything about one case's commands that breaks the promise."""
    found = []
    for cmd in result["cmds"]:
        argv, code, err = cmd["argv"][:1], cmd["code"], cmd["stderr"]
        lines = err.strip().splitlines()
        where = f"{case['id']} ({case['what']}) {' '.join(cmd['argv'][:1])}"
        if cmd["escaped"]:
            found.append(f"{where}: escaped main(): {cmd['escaped'][-1500:]}")
            continue
        if code not in (0, 1):
            found.append(f"{where}: exit {code!r}: {err[-500:]}")
        for bad in ("Traceback", "MemoryError", "Unable to allocate", "rerun with --debug"):
            if bad in err:
                found.append(f"{where}: {bad!r} on stderr: {err[-800:]}")
        if code == 1:
            if argv == ["validate"] and lines and all(ln.startswith("invalid: ") for ln in lines):
                pass  # validate's documented output: one line per problem
            elif len(lines) != 1 or not lines[0].startswith("error: "):
                found.append(f"{where}: exit 1 with stderr {err[-800:]!r}, not one 'error: ' line")
        out = cmd.get("output_validate")
        if code == 0 and argv == ["run"] and (out is None or out["code"] != 0):
            found.append(f"{where}: wrote an output that does not validate: {out and out['stderr'][-500:]}")
    codes = {c["argv"][0]: c["code"] for c in result["cmds"] if c["argv"][0] in ("inspect", "validate")}
    if codes.get("inspect") == 1 and codes.get("validate") == 0:
        found.append(f"{case['id']} ({case['what']}): inspect refuses it, validate passes it")
    grew = result["peak_rss"] - result["base_rss"]
    if grew > E2E_RSS_SLACK + 16 * case["size"]:
        found.append(f"{case['id']} ({case['what']}): resident memory grew {grew >> 20} MiB "
                     f"for a {case['size'] >> 10} KiB input")
    return found


def test_worker_ran_every_case_under_the_limit(e2e):
    """Each worker set the limit, passed its warm-up on the good inputs, and answered
    every case it was given."""
    cases, results = e2e["cases"], e2e["results"]
    biggest = max(size_of(p) for p in good_inputs().values())
    if len(cases) <= E2E_BATCH:
        assert len(e2e["workers"]) == 1
    for worker in e2e["workers"]:
        assert worker["limit"] == worker["base_vm"] + E2E_HEADROOM + 16 * biggest
        assert worker["base_vm"] > 0 and worker["warmup"], worker
        for warm in worker["warmup"]:
            assert [c["code"] for c in warm["cmds"]] == [0] * (2 + len(RUNS)), warm
    assert set(results) == {c["id"] for c in cases}
    kinds = {c["kind"] for c in cases}
    assert len(cases) >= len(kinds) * (1 + min(E2E_CASES, 4)), len(cases)


@pytest.mark.parametrize("kind", E2E_KINDS)
def test_good_input_passes_under_the_limit(e2e, kind):
    """The unmutated input: every command exits 0 under the limit, outputs validate."""
    good(kind)
    result = e2e["results"][f"{kind}-good"]
    codes = [(c["argv"][0], c["code"], c.get("output_validate", {}).get("code")) for c in result["cmds"]]
    assert codes == [("inspect", 0, None), ("validate", 0, None)] + [("run", 0, 0)] * len(RUNS), result
    case = next(c for c in e2e["cases"] if c["id"] == f"{kind}-good")
    assert problems_of(case, result) == []


@pytest.mark.parametrize("kind", E2E_KINDS)
def test_mutated_inputs_end_to_end(e2e, kind):
    """Every mutated input of ``kind``: a model (exit 0) or one error line, for inspect,
    validate and both runs, within the address-space limit and the alarm."""
    good(kind)
    cases = [c for c in e2e["cases"] if c["kind"] == kind and c["what"] != "unmutated"]
    assert len(cases) >= min(E2E_CASES, 4), len(cases)
    found = [p for c in cases for p in problems_of(c, e2e["results"][c["id"]])]
    if os.environ.get("CONVCORE_FUZZ_VERBOSE"):
        codes = [tuple(cmd["code"] for cmd in e2e["results"][c["id"]]["cmds"]) for c in cases]
        grew = max(e2e["results"][c["id"]]["peak_rss"] - e2e["results"][c["id"]]["base_rss"] for c in cases)
        print(f"{kind}: {len(cases)} inputs; exit codes (inspect, validate, runs): "
              f"{sorted(set(codes))}; most resident memory over the worker's: {grew >> 20} MiB")
    assert not found, "\n".join(found[:10])
    # the mutations reached the readers: at least one was refused with an error line
    assert any(cmd["code"] == 1 for c in cases for cmd in e2e["results"][c["id"]]["cmds"])


def test_problems_of_flags_what_breaks_the_promise():
    """The checker itself: each kind of breach is reported."""
    case = {"id": "x", "what": "w", "size": 10}

    def cmd(argv, code, err="", escaped=None, out=None):
        rec = {"argv": [argv], "code": code, "stderr": err, "escaped": escaped}
        if out is not None:
            rec["output_validate"] = {"code": out, "stderr": ""}
        return rec

    ok = {"peak_rss": 100, "cmds": [cmd("inspect", 1, "error: x: bad\n"), cmd("validate", 1, "invalid: a\ninvalid: b\n"),
                                    cmd("run", 0, "wrote y\n", out=0)]}
    assert problems_of(case, {**ok, "base_rss": 100}) == []
    for bad in ([cmd("inspect", 2, "error: x\n")], [cmd("inspect", 1, "error: a\nerror: b\n")],
                [cmd("inspect", 1, "error: TypeError: x (rerun with --debug for details)\n")],
                [cmd("inspect", 1, "error: x: MemoryError\n")], [cmd("run", 0, "", out=1)],
                [cmd("inspect", "hang", "", escaped="Hang")], [cmd("validate", 1, "Traceback (most\n")]):
        assert problems_of(case, {"peak_rss": 100, "base_rss": 100, "cmds": bad}), bad
    assert problems_of(case, {"peak_rss": 2 * E2E_RSS_SLACK, "base_rss": 0, "cmds": []})


# 2. generated headers, in-process -------------------------------------------------------
def read_everything(path: Path, fmt: str) -> str:
    """Load (headers), read every tensor, and validate; only a one-line ConvcoreError may
    come out, and validate's problems are one line each. The validators are called
    through the hook, not ``Registry.validate``, whose net for unexpected exceptions
    would hide a validator's crash. Returns ``"model"`` or ``"error"``."""
    from convcore.registry import using

    registry = convcore.get_registry()
    outcome = "model"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        try:
            model = registry.load(path, fmt)
            for ref in model.tensors.values():
                ref.load()
        except convcore.ConvcoreError as exc:
            assert "\n" not in str(exc).strip()
            outcome = "error"
        try:
            with using(registry):
                results = registry.pm.hook.convcore_validate(path=Path(path), fmt=fmt)
        except convcore.ConvcoreError as exc:
            assert "\n" not in str(exc).strip()
        else:
            problems = [p for r in results if r for p in r]
            assert all(isinstance(p, str) and "\n" not in p.strip() for p in problems), problems
    # numpy's warnings go to stderr: the CLI's one error line would not be one line
    noise = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if issubclass(w.category, RuntimeWarning)]
    assert not noise, noise
    return outcome


def fuzz_loader(check, examples: int = GEN_EXAMPLES) -> None:
    """Run the hypothesis-driven ``check`` (returning read_everything's outcome) and
    assert that the generated inputs really reached the reader: some were refused."""
    outcomes: list[str] = []

    @settings(FUZZ, max_examples=examples)
    @given(data=st.data())
    def run(data):
        outcomes.append(check(data))

    run()
    if os.environ.get("CONVCORE_FUZZ_VERBOSE"):
        print(f"{check.__qualname__}: {len(outcomes)} inputs, {outcomes.count('model')} loaded")
    assert len(outcomes) >= min(examples, 10) and "error" in outcomes, outcomes


def fresh(tmp_path: Path, kind: str) -> Path:
    case = tmp_path / "case"
    shutil.rmtree(case, ignore_errors=True)
    return copy_input(good(kind), case)


# split GGUF ----------------------------------------------------------------------------
SPLIT_KEYS = {"split.no": "<H", "split.count": "<H", "split.tensors.count": "<i"}


def patch_kv(file: Path, key: str, value: int) -> None:
    """Overwrite a fixed-size GGUF value in place (the header layout is unchanged)."""
    raw = bytearray(file.read_bytes())
    name = key.encode()
    i = raw.find(struct.pack("<Q", len(name)) + name)
    assert i >= 0, key
    at = i + 8 + len(name) + 4
    fmt = SPLIT_KEYS[key]
    lo, hi = (0, 0xFFFF) if fmt == "<H" else (-2**31, 2**31 - 1)
    raw[at:at + struct.calcsize(fmt)] = struct.pack(fmt, min(max(value, lo), hi))
    file.write_bytes(bytes(raw))


def test_split_gguf_generated(tmp_path):
    """Split metadata that disagrees with itself or with the shard names, a missing or a
    duplicated shard: one line or a model."""

    def check(data):
        first = fresh(tmp_path, "gguf-split")
        shards = sorted(first.parent.glob("m-*-of-*.gguf"))
        for shard in shards:
            for key in SPLIT_KEYS:
                if data.draw(st.integers(0, 11)) == 0:
                    patch_kv(shard, key, data.draw(st.one_of(st.integers(0, 8), st.sampled_from(HUGE_INTS))))
        action = data.draw(st.sampled_from(["keys", "drop", "duplicate", "rename", "extra"]))
        n = len(shards)
        if action == "drop":
            data.draw(st.sampled_from(shards[1:])).unlink()
        elif action == "duplicate":
            a, b = data.draw(st.permutations(shards))[:2]
            shutil.copy(a, b)
        elif action == "rename":  # names claiming another count of shards
            m = data.draw(st.integers(1, 9).filter(lambda m: m != n))
            for i, shard in enumerate(shards):
                shard.rename(shard.with_name(f"m-{i + 1:05d}-of-{m:05d}.gguf"))
            first = first.with_name(f"m-00001-of-{m:05d}.gguf")
        elif action == "extra":  # a shard beyond the count, and the count claiming it
            shutil.copy(shards[-1], first.with_name(f"m-{n + 1:05d}-of-{n:05d}.gguf"))
        outcome = read_everything(first, "gguf")
        if action in ("drop", "duplicate", "rename"):  # never a model with tensors missing
            assert outcome == "error", action
        return outcome

    fuzz_loader(check, SPLIT_EXAMPLES)


# npz -----------------------------------------------------------------------------------
def npy_bytes(header: str, data: bytes, version: int = 1) -> bytes:
    """An .npy member with ``header`` (a Python literal, as numpy writes it) verbatim."""
    raw = header.encode("latin1", "replace")
    fmt = "<H" if version == 1 else "<I"
    pre = 10 if version == 1 else 12
    pad = (-(pre + len(raw) + 1)) % 64
    raw = raw + b" " * pad + b"\n"
    return b"\x93NUMPY" + bytes([version, 0]) + struct.pack(fmt, len(raw)) + raw + data


descrs = st.one_of(st.sampled_from(["<f4", "<f2", "|u1", "|i1", "<i8", "|O", "O", "<U4", "|V8",
                                    "[('a', '<f4')]", "[('a', 'O')]", "<c8", "", "f4", ">f4"]),
                   json_values.map(repr))
npy_headers = st.builds(
    lambda descr, fortran, shape, extra: "{" + f"'descr': {descr}, 'fortran_order': {fortran}, "
    f"'shape': {shape}, " + extra + "}",
    descrs.map(lambda d: d if d.startswith(("[", "'", '"')) or d in ("None", "True", "False")
               or d[:1].isdigit() or d[:1] == "-" or d[:1] == "{" else repr(d)),
    st.one_of(st.sampled_from(["False", "True", "0", "None", "'yes'"]), json_values.map(repr)),
    st.one_of(st.lists(big_ints, max_size=4).map(lambda s: repr(tuple(s))), json_values.map(repr)),
    st.sampled_from(["", "'x': 1, ", "'shape': (1,), "]))


def rewrite_member(npz: Path, member: str, payload: bytes) -> None:
    with zipfile.ZipFile(npz) as zf:
        items = [(i.filename, zf.read(i.filename)) for i in zf.infolist()]
    with zipfile.ZipFile(npz, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, raw in items:
            zf.writestr(name, payload if name == member else raw)


def test_npz_member_headers_generated(tmp_path):
    """An .npy member of the npz with any header: never unpickled, never allocated from
    the header's shape, one line or a model."""

    def check(data):
        if data.draw(st.booleans()):
            header = data.draw(npy_headers)
            body = data.draw(st.binary(max_size=256))
        else:  # a well-formed member of another dtype, shape or order than the manifest's
            descr = data.draw(st.sampled_from(["<f4", "<f2", "|u1", "|i1", "<i8", ">f4", "<f8", "|b1"]))
            shape = tuple(data.draw(st.lists(st.integers(0, 9), max_size=3)))
            header = f"{{'descr': {descr!r}, 'fortran_order': {data.draw(st.booleans())}, 'shape': {shape!r}, }}"
            body = data.draw(st.binary(min_size=int(np.prod(shape)) * np.dtype(descr).itemsize,
                                       max_size=int(np.prod(shape)) * np.dtype(descr).itemsize))
        case = fresh(tmp_path, "npz")
        npz = next(case.glob("*.npz"))
        with zipfile.ZipFile(npz) as zf:
            member = data.draw(st.sampled_from(sorted(zf.namelist())))
        rewrite_member(npz, member, npy_bytes(header, body, data.draw(st.sampled_from([1, 2]))))
        return read_everything(case, "npz")

    fuzz_loader(check)


def test_npz_object_member_is_never_unpickled(tmp_path):
    """A member holding a pickled object array: refused, the pickle never runs."""
    import pickle

    case = fresh(tmp_path, "npz")
    npz = next(case.glob("*.npz"))
    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (Path.touch, (marker,))

    arr = np.empty(1, dtype=object)
    arr[0] = Boom()
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=True)
    with zipfile.ZipFile(npz) as zf:
        member = sorted(zf.namelist())[0]
    rewrite_member(npz, member, buf.getvalue())
    assert pickle.dumps  # the payload above really is a pickle
    read_everything(case, "npz")
    with pytest.raises(convcore.ConvcoreError):
        model = convcore.get_registry().load(case, "npz")
        for ref in model.tensors.values():
            ref.load()
    assert not marker.exists()


manifest_entries = st.fixed_dictionaries({}, optional={
    "name": st.one_of(st.text(max_size=12), json_values),
    "shape": shapes,
    "bit_width": st.one_of(st.sampled_from([32, 8, 4, 2, 1, 0, 3, -8, 64]), json_values),
    "scheme": st.one_of(st.sampled_from(["int8-row", "int4-row", "int1-row", "f32", "q8_0", ""]), json_values),
    "dtype": st.one_of(st.sampled_from(["f32", "f16", "bf16", "i64", "u8", "x"]), json_values),
    "q": st.one_of(st.sampled_from(["w0", "w1_q", "../x", "w1_scales"]), json_values),
    "q_scales": st.one_of(st.sampled_from(["w1_scales", "w0", "nope"]), json_values),
    "q_zero_point": st.one_of(st.sampled_from(["w1_zp", "w0"]), json_values),
    "rel_error": st.one_of(st.floats(allow_nan=True), json_values),
})


def test_npz_manifest_generated(tmp_path):
    """Manifest entries (and the manifest's own fields) with values of any JSON kind."""

    def check(data):
        case = fresh(tmp_path, "npz")
        manifest_file = next(case.glob("*_manifest_q*.json"))
        manifest = json.loads(manifest_file.read_text())
        weights = manifest["weights"]
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(weights) - 1))
            if data.draw(st.integers(0, 4)) == 0 or not isinstance(weights[i], dict):
                weights[i] = data.draw(json_values)
            else:
                weights[i].update(data.draw(manifest_entries))
        if data.draw(st.integers(0, 4)) == 0:
            key = data.draw(st.sampled_from(["weights", "file", "model", "quantization", "format_version"]))
            manifest[key] = data.draw(json_values)
        manifest_file.write_text(json.dumps(manifest))
        return read_everything(case, "npz")

    fuzz_loader(check)


# parquet -------------------------------------------------------------------------------
def parquet_column(data: st.DataObject, column, rows: int):
    """A column of the same name: the same type with generated values, or another type."""
    import pyarrow as pa

    kind = data.draw(st.sampled_from(["values", "values", "type", "nulls"]))
    if kind == "nulls":
        return pa.array([None] * rows, type=column.type)
    if kind == "type":
        other = data.draw(st.sampled_from(["int64", "string", "float", "binary", "list_str"]))
        gen = {"int64": (big_ints.filter(lambda v: -2**63 <= v < 2**63), pa.int64()),
               "string": (st.text(max_size=8), pa.string()),
               "float": (st.floats(allow_nan=True), pa.float64()),
               "binary": (st.binary(max_size=32), pa.binary()),
               "list_str": (st.lists(st.text(max_size=3), max_size=3), pa.list_(pa.string()))}[other]
        return pa.array(data.draw(st.lists(gen[0], min_size=rows, max_size=rows)), type=gen[1])
    values = column.to_pylist()
    t = column.type
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, rows - 1))
        if pa.types.is_list(t):
            width = 32 if t.value_type.bit_width == 32 else 64
            lo, hi = -2**(width - 1), 2**(width - 1) - 1
            values[i] = data.draw(st.lists(st.one_of(st.integers(-3, 64), st.sampled_from(
                [v for v in HUGE_INTS if lo <= v <= hi] + [hi, lo])), max_size=5))
        elif pa.types.is_integer(t):
            lo, hi = (-2**31, 2**31 - 1) if t.bit_width == 32 else (-2**63, 2**63 - 1)
            values[i] = data.draw(st.one_of(st.integers(-3, 300), st.sampled_from([lo, hi, -1, 0])))
        elif pa.types.is_binary(t):
            old = values[i] or b""
            values[i] = data.draw(st.one_of(st.just(old[:data.draw(st.integers(0, len(old)))]),
                                            st.just(old + b"\0" * data.draw(st.integers(1, 64))),
                                            st.binary(max_size=64)))
        elif pa.types.is_string(t):
            values[i] = data.draw(st.one_of(st.sampled_from(
                ["f32", "f16", "bf16", "int8-row", "int4-row", "q8_0", "", "none", "u32"]), st.text(max_size=8)))
    return pa.array(values, type=t)


def test_parquet_table_generated(tmp_path):
    """A weight table whose columns have the right names but wrong types or values
    (negative shapes, products past int64, data lengths that disagree): one line or a
    model."""

    def check(data):
        import pyarrow as pa
        import pyarrow.parquet as pq

        case = fresh(tmp_path, "parquet")
        table = pq.read_table(case)
        names = data.draw(st.lists(st.sampled_from(table.column_names), min_size=1, max_size=3, unique=True))
        columns = []
        for name in table.column_names:
            col = table.column(name).combine_chunks()
            columns.append(parquet_column(data, col, table.num_rows) if name in names else col)
        fields = [pa.field(n, c.type) for n, c in zip(table.column_names, columns)]
        new = pa.Table.from_arrays(columns, schema=pa.schema(fields, metadata=table.schema.metadata))
        pq.write_table(new, case, row_group_size=data.draw(st.sampled_from([1, 4, 1024])))
        return read_everything(case, "parquet")

    fuzz_loader(check)


# onnx ----------------------------------------------------------------------------------
def test_onnx_tensor_protos_generated(tmp_path):
    """Initializers with generated dims, data_type, raw_data and external-data location,
    offset and length: one line or a model."""

    def check(data):
        onnx = pytest.importorskip("onnx")
        case = fresh(tmp_path, "onnx")
        model = onnx.load(str(case / "model.onnx"), load_external_data=False)
        inits = list(model.graph.initializer)
        for _ in range(data.draw(st.integers(1, 3))):
            t = data.draw(st.sampled_from(inits))
            field = data.draw(st.sampled_from(["dims", "data_type", "raw_data", "location", "offset",
                                               "length", "inline"]))
            if field == "dims":
                dims = data.draw(st.lists(st.one_of(st.integers(-3, 64), st.sampled_from(
                    [-1, 2**31, 2**32, 2**40, 2**62, 2**63 - 1, -2**63])), max_size=4))
                del t.dims[:]
                t.dims.extend(dims)
            elif field == "data_type":
                t.data_type = data.draw(st.one_of(st.integers(0, 26), st.sampled_from([-1, 2**31 - 1])))
            elif field == "raw_data":
                t.raw_data = data.draw(st.binary(max_size=64))
            elif field == "inline":  # external data dropped: inline bytes (or none)
                t.data_location = onnx.TensorProto.DEFAULT
                del t.external_data[:]
                t.raw_data = data.draw(st.binary(max_size=64))
            else:
                value = data.draw(st.one_of(
                    st.sampled_from(["model.onnx.data", "../model.onnx.data", "/etc/passwd", "", "nope",
                                     "config.json", "model.onnx", "."]) if field == "location" else
                    st.one_of(big_ints.map(str), st.text(max_size=6))))
                entries = {e.key: e for e in t.external_data}
                if field in entries:
                    entries[field].value = value
                else:
                    t.external_data.add(key=field, value=value)
                t.data_location = onnx.TensorProto.EXTERNAL
        (case / "model.onnx").write_bytes(model.SerializeToString())
        return read_everything(case, "onnx")

    fuzz_loader(check)


# mlx -----------------------------------------------------------------------------------
quant_blocks = st.one_of(
    st.fixed_dictionaries({}, optional={
        "bits": st.one_of(st.sampled_from([2, 3, 4, 5, 6, 8, 0, -4, 32]), json_values),
        "group_size": st.one_of(st.sampled_from([32, 64, 128, 0, -64, 1, 2**40]), json_values),
        "mode": st.one_of(st.sampled_from(["affine", "mxfp4", ""]), json_values)}),
    json_values)


def test_mlx_config_and_index_generated(tmp_path):
    """config.json quantization fields (the default block and per-module entries) and the
    index's weight_map values of any kind: one line or a model."""

    def check(data):
        case = fresh(tmp_path, "mlx")
        config = json.loads((case / "config.json").read_text())
        index = json.loads((case / "model.safetensors.index.json").read_text())
        if data.draw(st.booleans()):
            key = data.draw(st.sampled_from(["quantization", "quantization_config"]))
            block = config.get(key) if isinstance(config.get(key), dict) else {}
            gen = data.draw(quant_blocks)
            if isinstance(gen, dict) and data.draw(st.booleans()):
                block.update(gen)
            else:
                block = gen
            if isinstance(block, dict) and data.draw(st.booleans()):
                modules = sorted(n[:-len(".weight")] for n in index["weight_map"] if n.endswith(".weight"))
                block[data.draw(st.sampled_from(modules))] = data.draw(st.one_of(quant_blocks, st.booleans()))
            config[key] = block
        else:
            weight_map = index["weight_map"]
            for _ in range(data.draw(st.integers(1, 3))):
                name = data.draw(st.one_of(st.sampled_from(sorted(weight_map)), st.text(max_size=8)))
                weight_map[name] = data.draw(st.one_of(
                    st.sampled_from(["model.safetensors", "missing.safetensors", "../model.safetensors",
                                     "/tmp", "config.json", ""]), json_values))
            if data.draw(st.integers(0, 4)) == 0:
                index["weight_map"] = data.draw(json_values)
        (case / "config.json").write_text(json.dumps(config))
        (case / "model.safetensors.index.json").write_text(json.dumps(index))
        return read_everything(case, "mlx")

    fuzz_loader(check)


def test_generated_cases_reach_the_readers(tmp_path):
    """A sanity check on the generators: an unchanged copy loads, so the errors the
    generated cases get come from what was generated."""
    for kind, fmt in (("npz", "npz"), ("parquet", "parquet"), ("onnx", "onnx"), ("mlx", "mlx"),
                      ("gguf-split", "gguf")):
        path = fresh(tmp_path, kind)
        model = convcore.get_registry().load(path, fmt)
        assert model.tensors and convcore.get_registry().validate(path, fmt) == []
    assert ast.literal_eval(npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }",
                                      b"")[10:].decode().strip())["shape"] == (1,)
