"""The Starlette app of ``convcore serve``: OpenAI's endpoints over a
:class:`~convcore.sessions.SessionPool`.

    GET  /health                  status, the ids served and those loaded
    GET  /v1/models               the models served; /v1/models/{id} one of them
    POST /v1/completions          text from a prompt (a string or token ids)
    POST /v1/chat/completions     text from messages, rendered with the model's chat template
    POST /v1/embeddings           sentence embeddings from an encoder

Runtimes block, so every model call runs in a worker thread. A generation hands its
events to the event loop through a queue: ``("ready",)`` once the model is open and the
prompt checked (until then a failure is still an HTTP error status), then
``("text", index, piece)`` and ``("end", index, finish_reason, prompt_tokens,
completion_tokens)`` per prompt. A stream whose client has gone stops at the next token.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from typing import Any, AsyncIterator, Callable, Sequence

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import openai_api as api
from .generation import IncrementalText, Sampling, generate
from convcore.model import ConvcoreError
from .openai_api import ApiError
from convcore.runtime import Session
from .sessions import LoadError, Prepared, SessionPool, Tokenizer

log = logging.getLogger("convcore_serve")

Event = tuple
Produce = Callable[[Callable[[Event], None], threading.Event], None]
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def as_api_error(exc: BaseException) -> ApiError:
    """Any failure as the OpenAI error it is answered with; one line, no traceback (that
    goes to the server's log when the failure is a bug, not a model's or a request's)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, LoadError):
        return ApiError(500, str(exc), type="server_error", code="model_load_failed")
    if isinstance(exc, ConvcoreError):
        return ApiError(500, str(exc), type="server_error")
    log.error("request failed", exc_info=exc)
    first = (str(exc).strip().splitlines() or [""])[0]
    return ApiError(500, f"{type(exc).__name__}: {first}", type="server_error")


def error_response(exc: BaseException) -> JSONResponse:
    err = as_api_error(exc)
    return JSONResponse(err.body, err.status)


def fit(prompts: Sequence[list[int]], sampling: Sampling, n_ctx: int, param: str) -> Sampling:
    """``sampling`` with ``max_tokens`` filled in (-1: up to the end of the context),
    or a 400 when a prompt is empty or prompt and completion outgrow the context."""
    if any(not ids for ids in prompts):
        raise ApiError(400, f"{param}: the prompt has no tokens", param=param)
    longest = max(len(ids) for ids in prompts)
    if sampling.max_tokens < 0:
        sampling = dataclasses.replace(sampling, max_tokens=max(n_ctx - longest, 0))
    if longest >= n_ctx or longest + sampling.max_tokens > n_ctx:
        raise ApiError(400, f"this model's context is {n_ctx} tokens; the prompt has {longest} and "
                            f"max_tokens asks for {sampling.max_tokens} more", param=param,
                       code="context_length_exceeded")
    return sampling


def checked(session: Session, prompts: Sequence[list[int]], param: str) -> list[list[int]]:
    """The prompts' ids, each checked against the session's vocabulary."""
    try:
        return [session.check_ids(ids) for ids in prompts]
    except ConvcoreError as exc:
        raise ApiError(400, f"{param}: {exc}", param=param) from None


class Api:
    """The endpoints, over one pool of sessions."""

    def __init__(self, pool: SessionPool):
        self.pool = pool
        self._streams: set[asyncio.Future] = set()  # running stream threads, kept referenced

    # helpers -------------------------------------------------------------------------
    def model_of(self, body: dict[str, Any]) -> str:
        model_id = api.string(body, "model")
        if model_id not in self.pool.models:
            raise api.not_found(model_id)
        return model_id

    async def prepare(self, model_id: str) -> Prepared:
        return await run_in_threadpool(self.pool.prepare, model_id)

    @staticmethod
    def tokenizer(model_id: str, prepared: Prepared) -> Tokenizer:
        if prepared.tokenizer is None:
            raise ApiError(400, f"{model_id} has no tokenizer to read or write text with "
                                f"({prepared.no_tokenizer})", param="model")
        return prepared.tokenizer

    def producer(self, model_id: str, tok: Tokenizer, prompts: Sequence[list[int]],
                 sampling: Sampling, param: str) -> Produce:
        """The generation of a request, to run in a worker thread."""
        def produce(emit: Callable[[Event], None], cancel: threading.Event) -> None:
            with self.pool.use(model_id) as loaded:
                session = loaded.session
                if session.kind != "decoder":
                    raise ApiError(400, f"{model_id} is an embedding model; it generates no text "
                                        "(use /v1/embeddings)", param="model")
                ids_list = checked(session, prompts, param)
                emit(("ready",))
                for index, ids in enumerate(ids_list):
                    text = IncrementalText(tok, sampling.stop)
                    count, finish = 0, "length"
                    for token in generate(session, ids, sampling, loaded.stop_ids):
                        count += 1
                        if token in loaded.stop_ids:
                            finish = "stop"  # the end-of-text token is not part of the text
                            break
                        piece = text.push(token)
                        if piece:
                            emit(("text", index, piece))
                        if text.stopped:
                            finish = "stop"
                            break
                        if cancel.is_set():
                            return
                    rest = text.flush()
                    if rest:
                        emit(("text", index, rest))
                    emit(("end", index, finish, len(ids), count))
        return produce

    async def collect(self, produce: Produce) -> list[Event]:
        """Run a generation to its end; its events."""
        events: list[Event] = []
        await run_in_threadpool(produce, events.append, threading.Event())
        return [e for e in events if e[0] != "ready"]

    async def start(self, produce: Produce) -> AsyncIterator[Event]:
        """Start a generation in a worker thread; once it is ready, its events as they
        come. A failure before that raises here; one after is an ``("error", body)``."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        cancel = threading.Event()

        def put(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the event loop is closed: the server is stopping
                cancel.set()

        def work() -> None:
            try:
                produce(put, cancel)
            except BaseException as exc:  # noqa: BLE001 - handed to the request, not lost
                put(("error", exc))
            else:
                put(("done",))

        task = asyncio.ensure_future(run_in_threadpool(work))
        self._streams.add(task)
        task.add_done_callback(self._streams.discard)
        try:
            first = await queue.get()
        except BaseException:
            cancel.set()
            raise
        if first[0] == "error":
            raise first[1]

        async def events() -> AsyncIterator[Event]:
            try:
                while True:
                    event = await queue.get()
                    if event[0] == "done":
                        return
                    if event[0] == "error":
                        yield ("error", as_api_error(event[1]).body)
                        return
                    yield event
            finally:
                cancel.set()  # the client went away, or the stream ended: either way, stop

        return events()

    # endpoints -----------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "models": list(self.pool.models),
                             "loaded": self.pool.loaded()})

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [m.card() for m in self.pool.models.values()]})

    async def get_model(self, request: Request) -> Response:
        model_id = request.path_params["model_id"]
        if model_id not in self.pool.models:
            raise api.not_found(model_id)
        return JSONResponse(self.pool.models[model_id].card())

    async def completions(self, request: Request) -> Response:
        body = api.body_of(await request.body())
        model_id = self.model_of(body)
        sampling = api.sampling(body, max_tokens=16)
        raw = api.prompts(body.get("prompt"), "prompt")
        stream = api.flag(body, "stream")
        prepared = await self.prepare(model_id)
        tok = self.tokenizer(model_id, prepared)
        prompts = [await run_in_threadpool(tok.encode, p) if isinstance(p, str) else p for p in raw]
        sampling = fit(prompts, sampling, prepared.n_ctx, "prompt")
        produce = self.producer(model_id, tok, prompts, sampling, "prompt")
        rid, created = api.new_id("cmpl"), api.now()

        def chunk(index: int, text: str, finish: str | None) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": created, "model": model_id,
                    "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}

        if stream:
            return self.stream(await self.start(produce), body, rid, created, model_id,
                               "text_completion", lambda e: chunk(e[1], e[2], None),
                               lambda e: chunk(e[1], "", e[2]), None)
        texts, finishes, used = self.fold(await self.collect(produce), len(prompts))
        return JSONResponse({
            "id": rid, "object": "text_completion", "created": created, "model": model_id,
            "choices": [{"index": i, "text": texts[i], "logprobs": None, "finish_reason": finishes[i]}
                        for i in range(len(prompts))],
            "usage": used})

    async def chat(self, request: Request) -> Response:
        body = api.body_of(await request.body())
        model_id = self.model_of(body)
        sampling = api.sampling(body, max_tokens=None)
        messages = api.messages(body)
        stream = api.flag(body, "stream")
        prepared = await self.prepare(model_id)
        tok = self.tokenizer(model_id, prepared)
        if not tok.has_chat_template:
            raise ApiError(400, f"{model_id} has no chat template; use /v1/completions with a prompt",
                           param="messages")
        try:
            ids = await run_in_threadpool(tok.chat, messages)
        except Exception as exc:  # noqa: BLE001 - a template's raise_exception, a Jinja error
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ApiError(400, f"the chat template of {model_id} rejects these messages: {first}",
                           param="messages") from None
        sampling = fit([ids], sampling, prepared.n_ctx, "messages")
        produce = self.producer(model_id, tok, [ids], sampling, "messages")
        rid, created = api.new_id("chatcmpl"), api.now()

        def chunk(delta: dict[str, str], finish: str | None) -> dict[str, Any]:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if stream:
            return self.stream(await self.start(produce), body, rid, created, model_id,
                               "chat.completion.chunk", lambda e: chunk({"content": e[2]}, None),
                               lambda e: chunk({}, e[2]), chunk({"role": "assistant", "content": ""}, None))
        texts, finishes, used = self.fold(await self.collect(produce), 1)
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": texts[0]},
                         "logprobs": None, "finish_reason": finishes[0]}],
            "usage": used})

    async def embeddings(self, request: Request) -> Response:
        body = api.body_of(await request.body())
        model_id = self.model_of(body)
        raw = api.prompts(body.get("input"), "input")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise ApiError(400, "encoding_format must be float or base64", param="encoding_format")
        prepared = await self.prepare(model_id)
        inputs = []
        for item in raw:
            inputs.append(await run_in_threadpool(self.tokenizer(model_id, prepared).encode, item)
                          if isinstance(item, str) else item)
        if any(not ids for ids in inputs):
            raise ApiError(400, "input: an input has no tokens", param="input")
        longest = max(len(ids) for ids in inputs)
        if longest > prepared.n_ctx:
            raise ApiError(400, f"this model's context is {prepared.n_ctx} tokens; an input has "
                                f"{longest}", param="input", code="context_length_exceeded")

        def work() -> list[np.ndarray]:
            with self.pool.use(model_id) as loaded:
                session = loaded.session
                if session.kind != "encoder":
                    raise ApiError(400, f"{model_id} generates text; it has no sentence embeddings "
                                        "(serve an embedding model)", param="model")
                return [np.asarray(session.embed(ids), dtype=np.float32)
                        for ids in checked(session, inputs, "input")]

        vectors = await run_in_threadpool(work)
        tokens = sum(len(ids) for ids in inputs)
        return JSONResponse({
            "object": "list", "model": model_id,
            "data": [{"object": "embedding", "index": i, "embedding": api.embedding_value(v, encoding)}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    # responses -----------------------------------------------------------------------
    @staticmethod
    def fold(events: Sequence[Event], count: int) -> tuple[list[str], list[str], dict[str, int]]:
        """The texts, finish reasons and usage of a finished generation's events."""
        texts, finishes = [""] * count, ["length"] * count
        prompt_tokens = completion_tokens = 0
        for event in events:
            if event[0] == "text":
                texts[event[1]] += event[2]
            elif event[0] == "end":
                finishes[event[1]] = event[2]
                prompt_tokens += event[3]
                completion_tokens += event[4]
        return texts, finishes, api.usage(prompt_tokens, completion_tokens)

    @staticmethod
    def stream(events: AsyncIterator[Event], body: dict[str, Any], rid: str, created: int,
               model_id: str, kind: str, text_chunk: Callable[[Event], dict[str, Any]],
               end_chunk: Callable[[Event], dict[str, Any]], first: dict[str, Any] | None) -> Response:
        """Server-sent events: ``first`` (chat's role), a chunk per piece of text and per
        finished prompt, the usage when ``stream_options.include_usage`` asks, ``[DONE]``."""
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and options.get("include_usage") is True

        async def lines() -> AsyncIterator[str]:
            prompt_tokens = completion_tokens = 0
            if first is not None:
                yield api.sse(first)
            async for event in events:
                if event[0] == "error":
                    yield api.sse(event[1])
                    return
                if event[0] == "text":
                    yield api.sse(text_chunk(event))
                elif event[0] == "end":
                    prompt_tokens += event[3]
                    completion_tokens += event[4]
                    yield api.sse(end_chunk(event))
            if include_usage:
                yield api.sse({"id": rid, "object": kind, "created": created, "model": model_id,
                               "choices": [], "usage": api.usage(prompt_tokens, completion_tokens)})
            yield api.sse("[DONE]")

        return StreamingResponse(lines(), media_type="text/event-stream", headers=SSE_HEADERS)


def endpoint(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
    """``handler`` answering every failure in OpenAI's error shape."""
    async def answer(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as exc:  # noqa: BLE001 - every failure is an answer, never a crash
            return error_response(exc)
    return answer


async def http_error(request: Request, exc: Exception) -> Response:
    """Unknown paths and wrong methods, in OpenAI's error shape."""
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", "") or "error"
    message = f"{request.method} {request.url.path}: {detail}"
    return JSONResponse(ApiError(status, message).body, status)


def create_app(pool: SessionPool, api_key: str | None = None, max_body: int | None = None) -> Any:
    """The ASGI app serving ``pool``'s models, behind :class:`~.guard.Guard` (the key,
    when given, and the request-size limit)."""
    from .guard import DEFAULT_MAX_BODY, Guard
    a = Api(pool)
    routes = [
        Route("/health", endpoint(a.health)),
        Route("/v1/models", endpoint(a.list_models)),
        Route("/v1/models/{model_id:path}", endpoint(a.get_model)),
        Route("/v1/completions", endpoint(a.completions), methods=["POST"]),
        Route("/v1/chat/completions", endpoint(a.chat), methods=["POST"]),
        Route("/v1/embeddings", endpoint(a.embeddings), methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    return Guard(app, api_key, DEFAULT_MAX_BODY if max_body is None else max_body)
