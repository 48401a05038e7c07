"""What stands in front of the API: an optional bearer key and a request-size limit.

``Guard`` is plain ASGI middleware. With a key, every route but ``/health`` answers 401 in
OpenAI's error shape unless the request carries ``Authorization: Bearer <key>`` (compared
in constant time, as llama.cpp's server and vLLM check ``--api-key``). A body over
``max_body`` bytes is refused with 413 before anything parses it: at once when its
``Content-Length`` says so, else as soon as the bytes received pass the limit.
"""
from __future__ import annotations

import hmac
from typing import Any

from .openai_api import ApiError

OPEN_PATHS = ("/health",)
DEFAULT_MAX_BODY = 32 << 20


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over {limit} bytes (convcore serve --max-body)",
                    code="request_too_large")


class Guard:
    def __init__(self, app: Any, api_key: str | None = None, max_body: int = DEFAULT_MAX_BODY):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body = int(max_body)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers") or ()}
        if self.key is not None and scope.get("path") not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"")
            given = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, self.key):
                await self._answer(scope, receive, send, ApiError(
                    401, "Incorrect API key provided: send it as 'Authorization: Bearer <key>'",
                    code="invalid_api_key"), {"www-authenticate": "Bearer"})
                return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await self._answer(scope, receive, send, too_large(self.max_body))
            return
        received = 0

        async def limited() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise too_large(self.max_body)   # the endpoint answers it, as every ApiError
            return message

        await self.app(scope, limited, send)

    @staticmethod
    async def _answer(scope: Any, receive: Any, send: Any, error: ApiError,
                      headers: dict[str, str] | None = None) -> None:
        from starlette.responses import JSONResponse
        await JSONResponse(error.body, error.status, headers=headers)(scope, receive, send)
