"""ASGI middleware: request ids, the request-body size limit, and HTTP metrics.

Pure ASGI (not `BaseHTTPMiddleware`) so streaming responses pass through untouched and the duration covers the
last byte of an SSE stream, not just its headers.
"""

from __future__ import annotations

import re
import time
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import PayloadTooLargeError, error_response
from workers import metrics
from workers.logging_setup import bind_request_id, new_request_id, request_id_var

REQUEST_ID_HEADER = b"x-request-id"
# A client-chosen id is echoed into logs and headers: keep it short and printable.
_SAFE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


class RequestContextMiddleware:
    """Give every request an id (the client's `x-request-id` or a new one), bound for logs, stored on
    `request.state.request_id`, and echoed in the response header; record the request in the HTTP metrics."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(REQUEST_ID_HEADER, b"")
        request_id = given.decode() if _SAFE_REQUEST_ID.fullmatch(given) else new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        token = bind_request_id(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER, request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)
            route = getattr(scope.get("route"), "path", "unmatched")
            metrics.track_http(route, scope["method"], status, time.perf_counter() - started)


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` with 413 before the app parses them.

    A declared Content-Length is checked up front; a chunked body is read here (the app buffers it whole anyway to
    parse the JSON) and counted, then replayed to the app. Raising from inside the app's body read would not do:
    FastAPI turns any error there into a 400.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        buffered: list[Message] = []
        seen = 0
        while True:
            message = await receive()
            buffered.append(message)
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = PayloadTooLargeError(f"The request body is larger than this service accepts ({self.max_bytes} bytes).")
        await error_response(error)(scope, receive, send)
