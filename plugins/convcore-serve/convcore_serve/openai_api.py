"""The OpenAI API's shapes, as ``convcore serve`` speaks them: errors, the fields of a
request checked one by one, and the objects of a response.

A field the server cannot honour (``n`` above 1, ``logprobs``, tools) is refused with a
400 naming it, never silently ignored; fields it has no use for (``user``,
``metadata``) are accepted as OpenAI accepts them.
"""
from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

import numpy as np

from .generation import Sampling

#: request fields accepted only with the value that changes nothing
DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "echo": (None, False),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []),
    "functions": (None, []),
    "dimensions": (None,),
}
MAX_STOP = 4  # stop strings per request, as OpenAI allows


class ApiError(Exception):
    """A request that fails, answered as ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}


def not_found(model_id: str) -> ApiError:
    return ApiError(404, f"The model {model_id!r} does not exist; GET /v1/models lists those served",
                    param="model", code="model_not_found")


def body_of(raw: bytes) -> dict[str, Any]:
    """The request's JSON object."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    for name, allowed in DEFAULT_ONLY.items():
        if name in body and body[name] not in allowed:
            raise ApiError(400, f"{name}={json.dumps(body[name])} is not supported by convcore serve",
                           param=name)
    return body


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def string(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{name} must be a non-empty string", param=name)
    return value


def integer(body: dict[str, Any], name: str, default: int | None, minimum: int = 0) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value) or value < minimum:
        raise ApiError(400, f"{name} must be an integer >= {minimum}, not {json.dumps(value)}", param=name)
    return int(value)


def number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise ApiError(400, f"{name} must be a number from {low:g} to {high:g}, not {json.dumps(value)}",
                       param=name)
    return float(value)


def flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false", param=name)
    return value


def stops(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items) or len(items) > MAX_STOP:
        raise ApiError(400, f"stop must be a string or a list of at most {MAX_STOP} strings", param="stop")
    return tuple(s for s in items if s)


def sampling(body: dict[str, Any], max_tokens: int | None) -> Sampling:
    """The sampling fields of a completion or chat request; ``max_tokens`` is the
    default when the request gives none (``max_completion_tokens`` in chat)."""
    limit = integer(body, "max_tokens", None)
    if limit is None:
        limit = integer(body, "max_completion_tokens", max_tokens)
    return Sampling(max_tokens=-1 if limit is None else limit,
                    temperature=number(body, "temperature", 1.0, 0.0, 2.0),
                    top_p=number(body, "top_p", 1.0, 0.0, 1.0),
                    seed=integer(body, "seed", None, minimum=-(2 ** 63)),
                    stop=stops(body))


def is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_int(t) for t in value)


def prompts(value: Any, name: str) -> list[str | list[int]]:
    """A ``prompt`` or ``input`` field as a list of texts and token-id lists: a string,
    a list of ids, or a list of either."""
    if isinstance(value, str) or is_ids(value):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) or is_ids(v) for v in value):
        return list(value)
    raise ApiError(400, f"{name} must be a string, a list of token ids, or a non-empty list of either",
                   param=name)


def messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """Chat messages as ``{role, content}`` with text content (a list of text parts is
    joined, as OpenAI's models read it)."""
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a role", param="messages")
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                               param="messages")
            content = "".join(p["text"] for p in content)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                           param="messages")
        out.append({"role": message["role"], "content": content})
    return out


# responses -----------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def embedding_value(vector: np.ndarray, encoding: str) -> list[float] | str:
    """``float``: a list of numbers; ``base64``: the little-endian float32 bytes, as
    OpenAI's client asks for by default."""
    v = np.asarray(vector, dtype="<f4")
    if encoding == "base64":
        return base64.b64encode(v.tobytes()).decode("ascii")
    return [float(x) for x in v]


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: ``data: ...`` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
