"""convcore serve: the OpenAI API over real runtimes (llama.cpp for gguf, transformers
for hf dirs and encoders), spoken to with the official ``openai`` client, each answer
checked against ``convcore infer`` on the same model in a separate process.

Two servers run for the whole module, started side by side with the ``infer`` runs
they are compared with: one serving four models with ``--max-loaded 2``, one serving
two with ``--max-loaded 1`` so every switch closes a session and opens another.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

import convcore
from convcore import fidelity
from convcore_serve.generation import IncrementalText
from convcore.testing.models import tiny_encoder, tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]

PROMPT = "The cat sat on"
MAX_TOKENS = 12
CHAT = [{"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Where is the cat?"}]
CHAT_TOKENS = 10
SENTENCE = "the quick brown fox jumps over the lazy dog"
READY = re.compile(r"serving (\d+) model\(s\) on (http://\S+)")


def convcore_cmd(*args: Any) -> list[str]:
    return [sys.executable, "-m", "convcore", *map(str, args)]


def start(args: list[Any], log: Path) -> subprocess.Popen:
    with log.open("w") as err:
        return subprocess.Popen(convcore_cmd("serve", *args, "--port", "0"),
                                stdout=subprocess.DEVNULL, stderr=err)


def wait_ready(proc: subprocess.Popen, log: Path, timeout: float = 120) -> str:
    """The server's base URL once it prints its address and /health answers."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = READY.search(log.read_text())
        if found:
            try:
                if httpx.get(found[2] + "/health", timeout=5).status_code == 200:
                    return found[2]
            except httpx.TransportError:
                pass
        if proc.poll() is not None:
            pytest.fail(f"convcore serve exited with {proc.returncode}: {log.read_text()}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"convcore serve did not answer within {timeout} s: {log.read_text()}")


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def finished(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert out.endswith("\n")
    return out[:-1]  # the newline echo adds, nothing else


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    """The models by the ids they are served as: a q8_0 gguf, the hf dir it came from,
    an encoder and a model without a chat template (the dirs are links, as a hub cache's
    are, named for short ids)."""
    pytest.importorskip("llama_cpp")
    root = tmp_path_factory.mktemp("serve-models")
    hf = tiny_model("qwen2")
    out = {"qwen-q8": root / "qwen-q8.gguf", "qwen-hf": root / "qwen-hf",
           "minilm": root / "minilm", "llama-hf": root / "llama-hf"}
    convcore.convert(hf, out["qwen-q8"], to="gguf", quant="q8_0")
    out["qwen-hf"].symlink_to(hf, target_is_directory=True)
    out["minilm"].symlink_to(tiny_encoder(), target_is_directory=True)
    out["llama-hf"].symlink_to(tiny_model("llama"), target_is_directory=True)
    return out


@pytest.fixture(scope="module")
def chat_ids(paths: dict[str, Path]) -> list[int]:
    """The chat rendered by transformers from the original HF dir's own tokenizer."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tiny_model("qwen2")))
    out = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def stack(paths: dict[str, Path], chat_ids: list[int], tmp_path_factory) -> Iterator[dict[str, Any]]:
    """Both servers and every ``convcore infer`` answer, all started at once."""
    pytest.importorskip("openai")
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    tmp = tmp_path_factory.mktemp("serve-run")
    logs = {"main": tmp / "main.log", "one": tmp / "one.log"}
    servers = {
        "main": start([paths["qwen-q8"], paths["qwen-hf"], paths["minilm"], paths["llama-hf"],
                       "--max-loaded", "2"], logs["main"]),
        "one": start([paths["qwen-q8"], paths["qwen-hf"], "--max-loaded", "1"], logs["one"]),
    }
    text = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    infers = {
        "qwen-q8": subprocess.Popen(convcore_cmd("infer", paths["qwen-q8"], "--prompt", PROMPT,
                                                 "--max-tokens", MAX_TOKENS), **text),
        "qwen-hf": subprocess.Popen(convcore_cmd("infer", paths["qwen-hf"], "--prompt", PROMPT,
                                                 "--max-tokens", MAX_TOKENS), **text),
        "chat": subprocess.Popen(convcore_cmd("infer", paths["qwen-q8"], "--tokens",
                                              ",".join(map(str, chat_ids)), "--max-tokens", CHAT_TOKENS),
                                 **text),
        "minilm": subprocess.Popen(convcore_cmd("infer", paths["minilm"], "--prompt", SENTENCE,
                                                "--embedding", tmp / "minilm.npy"), **text),
    }
    try:
        expected = {name: finished(proc) for name, proc in infers.items()}
        urls = {name: wait_ready(proc, logs[name]) for name, proc in servers.items()}
        yield {"urls": urls, "servers": servers, "logs": logs, "expected": expected,
               "embedding": np.load(tmp / "minilm.npy")}
    finally:
        for proc in [*infers.values(), *servers.values()]:
            stop(proc)
    for name, log in logs.items():
        assert "Traceback" not in log.read_text(), f"{name}: {log.read_text()}"


def client(stack: dict[str, Any], server: str = "main") -> Any:
    import openai
    return openai.OpenAI(base_url=stack["urls"][server] + "/v1", api_key="x", max_retries=0)


def test_models_are_listed_by_id(stack: dict[str, Any]) -> None:
    c = client(stack)
    listed = c.models.list().data
    assert [m.id for m in listed] == ["qwen-q8", "qwen-hf", "minilm", "llama-hf"]
    assert all(m.object == "model" and m.owned_by == "convcore" and m.created > 0 for m in listed)
    assert c.models.retrieve("qwen-hf").id == "qwen-hf"


@pytest.mark.parametrize("model", ["qwen-q8", "qwen-hf"])
def test_greedy_completion_equals_infer(stack: dict[str, Any], model: str) -> None:
    """Both runtimes in one server: llama.cpp for the gguf, transformers for the dir."""
    r = client(stack).completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                         temperature=0)
    assert r.choices[0].text == stack["expected"][model]
    assert r.choices[0].finish_reason == "length"
    assert r.object == "text_completion" and r.model == model
    assert r.usage.completion_tokens == MAX_TOKENS
    tok = fidelity.tokenizer_for(convcore.load(tiny_model("qwen2")))
    assert r.usage.prompt_tokens == len(tok(PROMPT).input_ids)


def test_streamed_chat_equals_greedy_generation_of_the_template(
        stack: dict[str, Any], chat_ids: list[int]) -> None:
    from transformers import AutoTokenizer
    ids = [int(t) for t in stack["expected"]["chat"].split(",")]
    tok = AutoTokenizer.from_pretrained(str(tiny_model("qwen2")))
    finish = "length"
    if ids[-1] == tok.eos_token_id:  # the end-of-turn token ends the reply; it is no text
        ids, finish = ids[:-1], "stop"
    chunks = list(client(stack).chat.completions.create(
        model="qwen-q8", messages=CHAT, max_tokens=CHAT_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == tok.decode(ids) and len(text) > 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].usage.prompt_tokens == len(chat_ids)
    assert chunks[-1].usage.completion_tokens == len(stack["expected"]["chat"].split(","))
    # the same chat without streaming
    whole = client(stack).chat.completions.create(model="qwen-q8", messages=CHAT,
                                                  max_tokens=CHAT_TOKENS, temperature=0)
    assert whole.choices[0].message.content == text
    assert whole.choices[0].message.role == "assistant"


def test_stop_sequences_cut_the_text(stack: dict[str, Any]) -> None:
    """Streamed or not, the text ends before the first stop string; a partial match
    held back while streaming is never sent."""
    want = stack["expected"]["qwen-q8"]
    stop = want[len(want) // 2:len(want) // 2 + 3]
    cut = want[:want.index(stop)]
    c = client(stack)
    r = c.completions.create(model="qwen-q8", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                             stop=[stop, "never appears"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    pieces = list(c.completions.create(model="qwen-q8", prompt=PROMPT, max_tokens=MAX_TOKENS,
                                       temperature=0, stop=stop, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == cut
    assert pieces[-1].choices[0].finish_reason == "stop"


def test_sampling_is_repeatable_with_a_seed(stack: dict[str, Any]) -> None:
    c = client(stack)
    runs = [c.completions.create(model="qwen-q8", prompt=[1, 2, 3], max_tokens=8, temperature=0.9,
                                 top_p=0.95, seed=seed).choices[0].text for seed in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0]
    assert runs[0] != runs[2]  # 8 tokens from a near-uniform tiny model: a tie is ~impossible


def test_embeddings_equal_infer(stack: dict[str, Any]) -> None:
    c = client(stack)
    want = stack["embedding"]
    for encoding in ("float", "base64"):  # base64 is what the client asks for by default
        kwargs = {"encoding_format": "float"} if encoding == "float" else {}
        r = c.embeddings.create(model="minilm", input=[SENTENCE, "another one"], **kwargs)
        assert [d.index for d in r.data] == [0, 1]
        got = np.asarray(r.data[0].embedding, dtype=np.float32)
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-5
    assert r.usage.prompt_tokens > 10


def test_unknown_model_is_404(stack: dict[str, Any]) -> None:
    import openai
    c = client(stack)
    with pytest.raises(openai.NotFoundError) as err:
        c.completions.create(model="nope", prompt="x", max_tokens=2)
    assert err.value.status_code == 404 and err.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as err:
        c.models.retrieve("nope")
    assert err.value.code == "model_not_found"


@pytest.mark.parametrize("call,model,words", [
    ("chat", "llama-hf", "no chat template"),
    ("embed", "qwen-q8", "no sentence embeddings"),
    ("complete", "minilm", "embedding model"),
    ("long", "qwen-q8", "context is"),
    ("n", "qwen-q8", "n=2"),
])
def test_requests_it_cannot_answer_are_400(stack: dict[str, Any], call: str, model: str,
                                           words: str) -> None:
    import openai
    c = client(stack)
    calls = {
        "chat": lambda: c.chat.completions.create(model=model, messages=CHAT),
        "embed": lambda: c.embeddings.create(model=model, input="x"),
        "complete": lambda: c.completions.create(model=model, prompt="x"),
        "long": lambda: c.completions.create(model=model, prompt="x", max_tokens=100_000),
        "n": lambda: c.completions.create(model=model, prompt="x", n=2),
    }
    with pytest.raises(openai.BadRequestError) as err:
        calls[call]()
    assert words in err.value.message and err.value.type == "invalid_request_error"
    assert "Traceback" not in str(err.value.body)


def test_bad_bodies_get_openai_errors(stack: dict[str, Any]) -> None:
    import httpx
    url = stack["urls"]["main"]
    r = httpx.post(url + "/v1/completions", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(url + "/v1/completions", json={"model": "qwen-q8", "prompt": "x", "temperature": "hot"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = httpx.get(url + "/v1/nowhere")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_one_loaded_model_at_a_time_still_answers_alike(stack: dict[str, Any]) -> None:
    """--max-loaded 1: each switch closes one session and opens the other; answers stay
    the same. Then SIGTERM stops the server cleanly."""
    import httpx
    c = client(stack, "one")
    for model in ["qwen-q8", "qwen-hf", "qwen-q8"]:
        r = c.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
        assert r.choices[0].text == stack["expected"][model]
        assert httpx.get(stack["urls"]["one"] + "/health").json()["loaded"] == [model]
    assert stop(stack["servers"]["one"]) == 0
    log = stack["logs"]["one"].read_text()
    assert log.count('"POST /v1/completions HTTP/1.1" 200') == 3  # the access log, on stderr
    assert log.rstrip().endswith("stopped")


def test_the_pool_closes_the_least_recently_used(paths: dict[str, Path]) -> None:
    """Three ids over one gguf, two open at most: the least recently used goes, and one
    evicted while a request holds it keeps answering until that request ends."""
    from convcore_serve import ServedModel
    from convcore_serve.sessions import SessionPool
    pool = SessionPool([ServedModel(i, paths["qwen-q8"], "gguf") for i in "abc"], max_loaded=2)
    try:
        want = None
        for model_id in "aba":
            with pool.use(model_id) as loaded:
                got = loaded.session.logits([1, 2, 3])
                want = got if want is None else want
                assert np.array_equal(got, want)
        assert pool.loaded() == ["b", "a"]
        with pool.use("b") as held:
            with pool.use("c"):
                assert pool.loaded() == ["b", "c"]
            with pool.use("a"):
                assert pool.loaded() == ["c", "a"]  # b evicted while in use ...
            assert np.array_equal(held.session.logits([1, 2, 3]), want)  # ... and still open
        assert pool.prepare("a").n_ctx == 512  # the model's own context
    finally:
        pool.close()
    assert pool.loaded() == []


def test_incremental_text_never_splits_a_character() -> None:
    """Byte-level BPE splits é and 日 over several tokens: no piece holds half of one,
    and a stop string's first letters are held back until it is known not to match."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tiny_model("qwen2")))
    text = "naïve café, 日本語 ok"
    ids = tok(text, add_special_tokens=False).input_ids
    assert any(tok.decode(ids[:i]).endswith("\ufffd") for i in range(1, len(ids)))
    for stop, want in [((), text), (("日本", "zzz"), "naïve café, "), (("ok!",), text)]:
        stream = IncrementalText(tok, stop)
        pieces = [stream.push(t) for t in ids] + [stream.flush()]
        assert "".join(pieces) == want == stream.text
        assert not any("\ufffd" in p for p in pieces)
        assert stream.stopped == (want != text)


def test_without_starlette_the_error_names_the_extra(monkeypatch) -> None:
    from convcore_serve import ServedModel, serve
    monkeypatch.setitem(sys.modules, "starlette", None)  # what an install without it finds
    with pytest.raises(convcore.ConvcoreError, match=r"pip install convcore-serve"):
        serve([ServedModel("m", Path("m.gguf"))], port=0)


def test_a_model_registry_serves_its_variants(paths: dict[str, Path], tmp_path: Path, run_cli) -> None:
    """One model_registry.json argument: the fleet's variants, ids MODEL/VARIANT."""
    pytest.importorskip("convcore_fleet")   # the registry is made with convcore registry add
    from convcore_serve import models_from_args
    shutil.copy(paths["qwen-q8"], tmp_path / "q.gguf")
    registry = tmp_path / "model_registry.json"
    r = run_cli("registry", "add", registry, tmp_path / "q.gguf", "--model", "qwen", "--quant", "q8_0")
    assert r.returncode == 0, r.stderr
    served = models_from_args([registry])
    assert [(m.id, m.fmt, m.path.resolve()) for m in served] == [
        ("qwen/gguf-q8_0", "gguf", (tmp_path / "q.gguf").resolve())]
    assert served[0].card()["id"] == "qwen/gguf-q8_0"


def test_bad_arguments_are_one_line_errors(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "m").symlink_to(tiny_model("qwen2"), target_is_directory=True)
    (tmp_path / "b" / "m").symlink_to(tiny_model("qwen2"), target_is_directory=True)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVCORE_")}
    cases = {
        "no such file or directory": [tmp_path / "missing.gguf"],
        "no installed format recognises": [notes],
        "two models would be served as 'm'": [tmp_path / "a" / "m", tmp_path / "b" / "m"],
        "cannot listen on 127.0.0.1": [tmp_path / "a" / "m", "--port", busy.getsockname()[1]],
    }
    procs = {words: subprocess.Popen(convcore_cmd("serve", *args), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
             for words, args in cases.items()}
    try:
        for words, proc in procs.items():
            out, err = proc.communicate(timeout=120)
            assert proc.returncode != 0, (words, err)
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
            assert out == ""
    finally:
        busy.close()


@pytest.mark.full
@pytest.mark.mlx
@pytest.mark.onnx
def test_mlx_and_onnx_directories_answer_as_infer(tmp_path: Path) -> None:
    """The other runtimes behind the same API: mlx-lm for an MLX dir, onnxruntime for an
    ONNX dir; greedy text equals ``convcore infer`` on each."""
    pytest.importorskip("mlx_lm")
    pytest.importorskip("onnxruntime")
    hf = tiny_model("qwen2")
    dirs = {"qwen-mlx": tmp_path / "qwen-mlx", "qwen-onnx": tmp_path / "qwen-onnx"}
    convcore.convert(hf, dirs["qwen-mlx"], to="mlx", quant="int4-g64")
    convcore.convert(hf, dirs["qwen-onnx"], to="onnx", quant="int4-b32")
    log = tmp_path / "serve.log"
    server = start([*dirs.values(), "--max-loaded", "2"], log)
    text = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    infers = {name: subprocess.Popen(convcore_cmd("infer", path, "--prompt", PROMPT,
                                                  "--max-tokens", MAX_TOKENS), **text)
              for name, path in dirs.items()}
    try:
        expected = {name: finished(proc) for name, proc in infers.items()}
        url = wait_ready(server, log)
        import openai
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        for name in dirs:
            r = c.completions.create(model=name, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
            assert r.choices[0].text == expected[name], name
            assert r.usage.completion_tokens == MAX_TOKENS
            streamed = "".join(chunk.choices[0].text for chunk in c.completions.create(
                model=name, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True))
            assert streamed == expected[name], name
    finally:
        for proc in [*infers.values(), server]:
            stop(proc)
    assert "Traceback" not in log.read_text()


def test_streamed_text_survives_byte_fallback_runs() -> None:
    """A valid byte followed by bytes that are no UTF-8 (the decoder then writes U+FFFD
    for every byte of the run, the first too): the pieces joined equal the tokenizer's
    decode of all the ids, as ``convcore infer`` prints it (before, the first byte's
    "\\" went out and nothing after it ever did)."""
    from transformers import AutoTokenizer

    from convcore_serve.generation import IncrementalText
    from convcore_serve.sessions import Tokenizer
    tok = Tokenizer(AutoTokenizer.from_pretrained(str(tiny_model("llama"))))
    byte = {b: tok._tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in (0x5C, 0xE2, 0x82, 0xC3, 0xA9)}
    word = tok._tok("utable", add_special_tokens=False).input_ids
    for ids in ([byte[0x5C], byte[0xE2], byte[0x82], *word, byte[0x5C]],
                [*word, byte[0xC3], byte[0xA9], *word],            # a valid two-byte "é"
                [byte[0xE2], *word, byte[0xE2], byte[0x82]]):
        text = IncrementalText(tok)
        pieces = [text.push(t) for t in ids] + [text.flush()]
        assert "".join(pieces) == tok.decode(ids), (ids, pieces)
        assert sum(bool(p) for p in pieces) >= 2   # still streamed, not all at the end


def test_api_key_and_body_limit_guard_every_route_but_health(tmp_path: Path) -> None:
    """--api-key: 401 in OpenAI's shape without the bearer key (or with a wrong one) on
    every route but /health; --max-body: 413 before the body is parsed, whether its
    Content-Length says so or it arrives in chunks."""
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from convcore_serve import ServedModel
    from convcore_serve.app import create_app
    from convcore_serve.sessions import SessionPool
    pool = SessionPool([ServedModel("llama", tiny_model("llama"), "hf")])
    app = create_app(pool, api_key="s3cret", max_body=1000)
    with TestClient(app) as http:
        assert http.get("/health").status_code == 200
        for method, path in (("GET", "/v1/models"), ("GET", "/v1/models/llama"),
                             ("POST", "/v1/completions"), ("POST", "/v1/embeddings"), ("GET", "/nope")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                r = http.request(method, path, headers=headers, json={"model": "llama"})
                assert r.status_code == 401, (path, headers)
                assert r.json()["error"]["code"] == "invalid_api_key"
                assert r.headers["www-authenticate"] == "Bearer"
        ok = {"Authorization": "Bearer s3cret"}
        assert [m["id"] for m in http.get("/v1/models", headers=ok).json()["data"]] == ["llama"]
        big = {"model": "llama", "prompt": "x" * 2000, "max_tokens": 1}
        r = http.post("/v1/completions", headers=ok, json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks():
            yield b'{"model": "llama", "prompt": "'
            for _ in range(20):
                yield b"y" * 100
            yield b'"}'
        r = http.post("/v1/completions", headers={**ok, "Content-Type": "application/json"}, content=chunks())
        assert r.status_code == 413 and "--max-body" in r.json()["error"]["message"]
    pool.close()
    # no key: open, as before
    with TestClient(create_app(SessionPool([ServedModel("llama", tiny_model("llama"), "hf")]))) as http:
        assert http.get("/v1/models").status_code == 200


@pytest.mark.full   # the default tier applies adapters through infer --lora (tests/test_lora.py)
def test_serve_lora_answers_as_infer_lora(tmp_path: Path) -> None:
    """``serve --lora`` has llama.cpp apply the adapter GGUF: the greedy completion equals
    ``convcore infer --lora`` and differs from the base's."""
    from convcore.testing.adapters import tiny_lora

    hf = tiny_model("llama")
    base, adapter = tmp_path / "base.gguf", tmp_path / "adapter.gguf"
    convcore.convert(hf, base, to="gguf", dtype="f32")
    convcore.convert(tiny_lora(hf), adapter, to="gguf")
    log = tmp_path / "serve.log"
    server = start([base, "--lora", adapter], log)
    text = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = [subprocess.Popen(convcore_cmd("infer", base, "--prompt", PROMPT, "--max-tokens", MAX_TOKENS, *extra),
                             **text) for extra in (["--lora", adapter], [])]
    try:
        expected, plain = (finished(proc) for proc in runs)
        url = wait_ready(server, log)
        import openai
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = c.completions.create(model="base", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
        assert r.choices[0].text == expected != plain
    finally:
        for proc in [*runs, server]:
            stop(proc)
    assert "Traceback" not in log.read_text()
