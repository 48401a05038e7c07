"""One test per hook (enforced), each through a real plugin, plus docs completeness."""
from __future__ import annotations

import inspect
import re
import types
from pathlib import Path

import numpy as np
import pytest

import convcore
from convcore import hookspecs

ROOT = Path(__file__).resolve().parents[1]
HOOKS = sorted(n for n in dir(hookspecs) if n.startswith("convcore_"))


def make_plugin(**impls):
    module = types.ModuleType("testplugin")
    for name, fn in impls.items():
        setattr(module, name, convcore.hookimpl(fn))
    return module


def row_sum_scheme():
    """A toy scheme: each row stored as its float16 values (lossy, checkable)."""
    return convcore.Scheme(
        name="f16-rows", block_size=4, bits=16.0,
        quantize=lambda a, options: {"q": np.asarray(a, np.float32).astype(np.float16)},
        dequantize=lambda data, shape: data["q"].astype(np.float32).reshape(shape),
        layout=lambda shape, dtype: {"q": ("f16", tuple(shape))})


def test_every_hook_has_a_test():
    names = {n for n, _ in inspect.getmembers(__import__(__name__), inspect.isfunction)}
    for path in ROOT.glob("tests/test_*.py"):
        names |= set(re.findall(r"^def (test_hook_\w+)", path.read_text(), re.M))
    missing = [h for h in HOOKS if f"test_hook_{h}" not in names]
    assert missing == []


def test_every_hook_is_documented_with_its_signature():
    docs = (ROOT / "docs" / "plugins.md").read_text()
    for name in HOOKS:
        spec = getattr(hookspecs, name)
        args = ", ".join(inspect.signature(spec).parameters)
        assert f"{name}({args})" in docs, name
        assert spec.__doc__ and ":return:" in spec.__doc__, name


def test_hook_convcore_register_formats():
    registry = convcore.Registry(load_entry_points=False, plugins=(make_plugin(
        convcore_register_formats=lambda register: register(convcore.Format(name="toy"))),))
    assert registry.formats["toy"].plugin == "testplugin"
    assert registry.infos["testplugin"].formats == ["toy"]


def test_hook_convcore_register_schemes():
    registry = convcore.Registry(load_entry_points=False, plugins=(make_plugin(
        convcore_register_schemes=lambda register: register(row_sum_scheme())),))
    assert registry.scheme("f16-rows").plugin == "testplugin"
    with pytest.raises(convcore.ConvcoreError, match="no installed plugin provides"):
        registry.scheme("q9_9")


def test_missing_scheme_names_the_package_its_format_declares():
    """The hint comes from data the format plugin ships, not from names in the core."""
    registry = convcore.Registry(load_entry_points=False, plugins=(make_plugin(
        convcore_register_formats=lambda register: register(convcore.Format(
            name="toy", schemes=("q9_9",), scheme_package="toy-kernels"))),))
    with pytest.raises(convcore.ConvcoreError,
                       match=r"scheme 'q9_9'; format toy stores it with schemes from "
                             r"toy-kernels: pip install toy-kernels"):
        registry.scheme("q9_9")


def test_scheme_output_is_checked_against_its_layout():
    bad = row_sum_scheme()
    bad = convcore.Scheme(**{**bad.__dict__, "name": "liar",
                             "layout": lambda shape, dtype: {"q": ("f16", (shape[0],))}})
    registry = convcore.Registry(load_entry_points=False, plugins=(make_plugin(
        convcore_register_schemes=lambda register: register(bad)),))
    x = np.ones((3, 8), np.float32)
    with pytest.raises(convcore.ConvcoreError,
                       match=r"scheme liar \(plugin testplugin\) returned q: f16\[3, 8\] for "
                             r"f32\[3, 8\]; its layout declares q: f16\[3\]"):
        convcore.quantize(x, "liar", registry=registry)


def test_scheme_receives_options():
    seen = {}

    def quantize(a, options):
        seen.update(options)
        return {"q": np.asarray(a, np.float32).astype(np.float16)}

    scheme = convcore.Scheme(**{**row_sum_scheme().__dict__, "quantize": quantize})
    registry = convcore.Registry(load_entry_points=False, plugins=(make_plugin(
        convcore_register_schemes=lambda register: register(scheme)),))
    w = np.linspace(0, 1, 8, dtype=np.float32)
    convcore.quantize(np.ones((2, 8), np.float32), "f16-rows", {"weights": w, "name": "t"},
                      registry=registry)
    assert seen["name"] == "t" and seen["weights"] is w


def test_scheme_prepare_is_called_once_per_callable_with_all_its_names():
    calls = []

    def prepare(names, dtypes):
        calls.append((sorted(names), dtypes))

    base = row_sum_scheme().__dict__
    a = convcore.Scheme(**{**base, "name": "rows-a", "prepare": prepare})
    b = convcore.Scheme(**{**base, "name": "rows-b", "prepare": prepare})
    plain = convcore.Scheme(**{**base, "name": "rows-c"})
    registry = convcore.Registry(load_entry_points=False, plugins=(make_plugin(
        convcore_register_schemes=lambda register: [register(s) for s in (a, b, plain)]),))
    convcore.prepare(["rows-b", "rows-a", "rows-c", "f16", "nope", "rows-a"], ["bf16", "f32"],
                     registry=registry)
    assert calls == [(["rows-a", "rows-b"], ["bf16", "f32"])]

    def broken(names, dtypes):
        raise RuntimeError("compiler crashed\nwith details")

    c = convcore.Scheme(**{**base, "name": "rows-d", "prepare": broken})
    registry = convcore.Registry(load_entry_points=False, plugins=(make_plugin(
        convcore_register_schemes=lambda register: register(c)),))
    with pytest.raises(convcore.ConvcoreError, match="^preparing schemes rows-d: RuntimeError: compiler crashed$"):
        convcore.prepare(["rows-d"], registry=registry)


def test_load_as_uses_a_cast_loader_and_checks_what_it_returns():
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    asked = []

    def direct(dtype):
        asked.append(dtype)
        return convcore.cast(x, dtype)

    ref = convcore.TensorRef("w", (4, 8), "f32", lambda: x, cast_loader=direct)
    assert ref.load_as(None) is x and ref.load_as("f32") is x and asked == []
    np.testing.assert_array_equal(ref.load_as("f16"), x.astype(np.float16))
    assert asked == ["f16"]
    plain = convcore.TensorRef("w", (4, 8), "f32", lambda: x)
    np.testing.assert_array_equal(plain.load_as("bf16"), convcore.cast(x, "bf16"))
    liar = convcore.TensorRef("w", (4, 8), "f32", lambda: x, source="m.bin",
                              cast_loader=lambda dtype: x[:2].astype(np.float16))
    with pytest.raises(convcore.ConvcoreError, match=r"m.bin: tensor 'w' read as f16\[2, 8\]"):
        liar.load_as("f16")
    assert ref.with_loader(lambda: x).cast_loader is None  # a new loader: no stale shortcut


def test_load_chunks_streams_a_readers_pieces_and_checks_them():
    x = np.random.default_rng(2).standard_normal((6, 8)).astype(np.float32)

    def pieces(dtype):
        for r in range(0, 6, 4):
            yield convcore.cast(x[r:r + 4], dtype).reshape(-1)

    ref = convcore.TensorRef("w", (6, 8), "f32", lambda: x, source="m.bin", chunk_loader=pieces)
    got = np.concatenate(list(ref.load_chunks("f16")))
    np.testing.assert_array_equal(got, x.astype(np.float16).reshape(-1))
    plain = convcore.TensorRef("w", (6, 8), "f32", lambda: x)
    np.testing.assert_array_equal(np.concatenate(list(plain.load_chunks("bf16"))),
                                  convcore.cast(x, "bf16").reshape(-1))
    short = convcore.TensorRef("w", (6, 8), "f32", lambda: x, source="m.bin",
                               chunk_loader=lambda dtype: iter([x[:1].reshape(-1).astype(np.float16)]))
    with pytest.raises(convcore.ConvcoreError, match=r"^m.bin: tensor 'w' read as 8 values, expected 48"):
        list(short.load_chunks("f16"))

    def broken(dtype):
        yield x.reshape(-1)[:8].astype(np.float16)
        raise OSError("truncated\nfile")

    bad = convcore.TensorRef("w", (6, 8), "f32", lambda: x, source="m.bin", chunk_loader=broken)
    with pytest.raises(convcore.ConvcoreError, match=r"^m.bin: cannot read tensor 'w': OSError: truncated"):
        list(bad.load_chunks("f16"))


def test_hook_convcore_quantize():
    registry = convcore.Registry(load_entry_points=False, plugins=(make_plugin(
        convcore_register_schemes=lambda register: register(row_sum_scheme())),))
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    qt = convcore.quantize(x, "f16-rows", registry=registry)
    assert qt.scheme == "f16-rows" and qt.shape == (3, 8)
    np.testing.assert_array_equal(qt.dequantize(), x.astype(np.float16).astype(np.float32))
    with pytest.raises(convcore.ConvcoreError, match="row length 6 is not a multiple"):
        convcore.quantize(x[:, :6], "f16-rows", registry=registry)
    with pytest.raises(convcore.ConvcoreError, match="cannot quantize i32"):
        convcore.quantize(x.astype(np.int32), "f16-rows", registry=registry)


def test_hook_convcore_load(tiny_llama):
    model = convcore.get_registry().load(tiny_llama)
    assert model.format == "hf" and len(model.tensors) == 21
    assert model.config["hidden_size"] == 256 and "tokenizer.model" in model.tokenizer


def test_hook_convcore_map_names(tiny_llama):
    model = convcore.load(tiny_llama)
    registry = convcore.Registry(load_entry_points=False, plugins=(make_plugin(
        convcore_map_names=lambda model, target: {n: n.upper() for n in model.tensors}
        if target == "toy" else None),))
    mapping = registry.map_names(model, "toy")
    assert mapping["model.norm.weight"] == "MODEL.NORM.WEIGHT" and len(mapping) == 21
    assert registry.map_names(model, "other") == {}


def test_hook_convcore_write(tiny_llama, tmp_path):
    seen = []
    out = convcore.get_registry().write(convcore.load(tiny_llama), tmp_path / "o", "hf",
                                        {"dtype": "bf16"}, seen.append)
    assert len(seen) == 21 and (out / "model.safetensors").exists()
    assert {r.dtype for r in convcore.load(out).tensors.values()} == {"bf16"}


def test_hook_convcore_validate(tiny_llama, tmp_path):
    registry = convcore.get_registry()
    assert registry.validate(tiny_llama) == []
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text("{not json")
    (tmp_path / "cfg" / "model.safetensors").write_bytes(b"\x00" * 4)
    problems = registry.validate(tmp_path / "cfg", "hf")
    assert len(problems) == 1 and "not valid JSON" in problems[0]


def transformers_logits(path, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return model, model(torch.tensor([ids])).logits[0].numpy()


def test_hook_convcore_infer(tiny_llama):
    """The one-shot hook, answered by the core through the hf session."""
    ids = [1, 2, 3, 50, 7]
    logits = convcore.get_registry().infer(tiny_llama, ids)
    _, ref = transformers_logits(tiny_llama, ids)
    assert logits.shape == (5, 1024) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, ref, atol=1e-5, rtol=0)


def test_hook_convcore_open_session(tiny_llama):
    """A session computes a sequence's logits, continues it from its KV cache exactly as
    a full re-run would, generates as transformers' greedy generate does, and closes."""
    import torch

    ids = [1, 20, 30, 40, 5, 66]
    model, ref = transformers_logits(tiny_llama, ids)
    with convcore.get_registry().open_session(tiny_llama, options={"n_ctx": 32}) as session:
        assert session.vocab_size == 1024
        head = session.logits(ids[:3])
        tail = np.concatenate([session.decode([t]) for t in ids[3:]])
        np.testing.assert_allclose(np.concatenate([head, tail]), ref, atol=1e-4, rtol=0)
        generated = list(session.generate(ids, max_tokens=12))
        with pytest.raises(convcore.ConvcoreError, match="outside the vocabulary of 1024"):
            session.logits([5000])
    assert session.model is None  # closed on leaving the block
    expected = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert generated == expected


def test_hook_convcore_add_hookspecs(tmp_path):
    """A plugin adds a hook of its own; another plugin implements it; the registry checks
    it like a core hook and calls it through ``registry.hook``."""
    specs = types.ModuleType("toy_specs")

    def toy_register_colours(register):
        """Register colours."""
    specs.toy_register_colours = convcore.hookspec(toy_register_colours)
    host = make_plugin(convcore_add_hookspecs=lambda pluginmanager: pluginmanager.add_hookspecs(specs))
    guest = types.ModuleType("guest")
    guest.toy_register_colours = convcore.hookimpl(lambda register: register("teal"))
    registry = convcore.Registry(load_entry_points=False, plugins=(guest, host))
    colours = []
    registry.hook.toy_register_colours(register=colours.append)
    assert colours == ["teal"]
    # without the host plugin the guest's hook has no spec: the guest is dropped and
    # reported, the registry still works
    alone = convcore.Registry(load_entry_points=False, plugins=(guest,))
    assert "toy_register_colours" in alone.infos["guest"].error
    assert "guest" not in {alone.pm.get_name(p) for p in alone.pm.get_plugins()}
    assert "hf" in alone.formats


def test_ordered_map_keeps_order_bound_and_registry():
    """Results come in input order, and worker threads see the registry in use."""
    import threading

    registry = convcore.Registry(load_entry_points=False)
    seen = []
    together = threading.Barrier(2, timeout=30)   # items 0 and 1 can only pass it together

    def work(i):
        seen.append(convcore.get_registry() is registry)
        if i < 2:
            together.wait()
        return i * i, threading.get_ident()

    with convcore.using(registry):
        out = list(convcore.ordered_map(work, range(20), jobs=3))
    assert [r for r, _ in out] == [i * i for i in range(20)]
    assert all(seen) and len(seen) == 20
    assert out[0][1] != out[1][1]  # really ran on several threads (else the barrier breaks)


@pytest.mark.full
def test_hf_infer_is_quiet_unless_verbose(run_cli, tiny_llama):
    """The runtime's own progress output (transformers' weight-loading bar) stays off
    stderr; stdout is the answer."""
    r = run_cli("infer", tiny_llama, "--tokens", "1,2,3", "--max-tokens", "3", "--ignore-eos")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert len(r.stdout.strip().split(",")) == 3


def test_hook_convcore_register_executors(tmp_path):
    """A third party's executor (jobs run inline, in this process) drives a real batch:
    the hook the fleet plugin adds, next to the fleet plugin itself."""
    import convcore_fleet
    from convcore_fleet import Executor
    from convcore_fleet.batch import Batch
    from convcore_fleet.worker import run_job
    from convcore.testing.models import tiny_model

    class Inline(Executor):
        name = "inline"
        options = (convcore.Option("tag", "str", "x", "a label"),)

        def run(self, jobs, parallel, options):
            self.seen = (len(jobs), options["tag"])
            for job in jobs:
                yield run_job(job)

    inline = Inline()
    registry = convcore.Registry(load_entry_points=False, plugins=(convcore_fleet, make_plugin(
        convcore_register_executors=lambda register, fleet: register(inline)),))
    (tmp_path / "jobs.toml").write_text(
        f'[[model]]\nid = "t"\nsource = "{tiny_model("llama")}"\n'
        '[[target]]\nto = "hf"\nquant = ["f16", "bf16"]\n')
    summary = Batch(tmp_path / "jobs.toml", executor="inline", executor_options={"tag": "y"},
                    progress=False, registry=registry).run()
    assert inline.seen == (2, "y")
    assert [r["status"] for r in summary["jobs"]] == ["ok", "ok"]
    assert (tmp_path / "jobs-out" / "t" / "hf-f16" / "config.json").exists()
    with pytest.raises(convcore.ConvcoreError, match="executor inline has no option 'nope'"):
        Batch(tmp_path / "jobs.toml", executor="inline", executor_options={"nope": "1"}, registry=registry)
    with pytest.raises(convcore.ConvcoreError, match="no executor named 'mars'"):
        Batch(tmp_path / "jobs.toml", executor="mars", registry=registry)


def test_read_ahead_makes_the_next_chunk_on_a_thread_in_order():
    """write_sharded's chunk read-ahead: items in order, made one at a time on the pool's
    thread while the caller holds the previous one; an error raised where it is taken;
    leaving early waits for the chunk in the making (the generator is never closed while
    it runs)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from convcore.safetensors_io import read_ahead

    made, busy = [], threading.Lock()

    def chunks(n, fail_at=None):
        for i in range(n):
            assert busy.acquire(blocking=False), "two chunks in the making at once"
            try:
                made.append((i, threading.current_thread().name))
                if i == fail_at:
                    raise ValueError(f"chunk {i} is broken")
            finally:
                busy.release()
            yield i

    with ThreadPoolExecutor(1, thread_name_prefix="ahead") as pool:
        seen = []
        for item in read_ahead(chunks(5), pool):
            seen.append((item, len(made)))
        assert [s[0] for s in seen] == [0, 1, 2, 3, 4]
        assert all(n >= item + 1 for item, n in seen)  # made before or while it was used
        assert {name for _, name in made} == {"ahead_0"}
        with pytest.raises(ValueError, match="chunk 2 is broken"):
            list(read_ahead(chunks(5, fail_at=2), pool))
        it = read_ahead(chunks(100), pool)
        assert next(it) == 0
        it.close()  # chunk 1 was asked for: cancelled if not started, else waited for
        assert not busy.locked() and len(made) in (5 + 3 + 1, 5 + 3 + 2)
        assert [i for i, _ in made[:8]] == [0, 1, 2, 3, 4, 0, 1, 2]


def test_hook_convcore_register_commands(run_cli):
    """A plugin's command joins the CLI; a name already taken is refused naming the
    plugin; a plugin command whose distribution is missing names it (one line)."""
    import click
    from click.testing import CliRunner

    from convcore.cli_group import _Group

    @click.command()
    @click.argument("who")
    def hello(who):
        """Say hello."""
        click.echo(f"hello {who}")

    def fresh():
        return _Group(commands={"run": click.Command("run", callback=lambda: None)})

    registry = convcore.Registry(load_entry_points=False, plugins=(make_plugin(
        convcore_register_commands=lambda cli: cli.add_command(hello)),))
    with convcore.using(registry):
        group = fresh()
        assert CliRunner().invoke(group, ["hello", "you"]).output == "hello you\n"
        assert "hello" in CliRunner().invoke(group, ["--help"]).output
    clash = convcore.Registry(load_entry_points=False, plugins=(make_plugin(
        convcore_register_commands=lambda cli: cli.add_command(click.Command("run"))),))
    with convcore.using(clash):
        r = CliRunner().invoke(fresh(), ["run"])
    assert isinstance(r.exception, convcore.ConvcoreError) and "'run'" in str(r.exception)
    assert "already has" in str(r.exception)
    broken = convcore.Registry(load_entry_points=False, plugins=(make_plugin(
        convcore_register_commands=lambda cli: 1 / 0),))
    with convcore.using(broken):
        r = CliRunner().invoke(fresh(), ["run"])
    assert isinstance(r.exception, convcore.ConvcoreError)
    assert "failed in convcore_register_commands: ZeroDivisionError" in str(r.exception)
    import os
    r = run_cli("serve", "x.gguf", env={**os.environ, "CONVCORE_DISABLE_PLUGINS": "serve"})
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "convcore-serve plugin, which is installed but not loaded" in r.stderr
