"""
The reward server's defences in front of its endpoints: raw ASGI middleware that decide from the request line and
headers alone, before any of the body is read, and a uvicorn protocol that bounds how long headers may take.

In the order a request meets them:

1. [`RequestMetrics`]: every answer counted by route template (`/score`; a path no route matches is `unmatched`) and
   status, answers of 500 included, so the metrics stay as small as the app's route table.
2. [`BearerAuth`]: with a token set, a request to anything but `/health` without it gets 401 before its body is read.
3. [`ConcurrencyLimit`]: at most `max_concurrent` POST requests at once (their bodies are held in memory); past it,
   503 with `Retry-After`, the body unread.
4. [`BodyLimits`]: a body of at most `max_bytes`, counted as it arrives (chunked too), else 413; arriving within
   `timeout_s` of the headers, else 408.

A refused request's unread body is read and discarded by uvicorn as it arrives, within the header timeout of
[`header_timeout_protocol`], which closes any connection whose next request line and headers do not arrive within
`timeout_s` (of its opening, of the last answer): a half-sent header, an unfinished body after a refusal, a client
that connects and sends nothing.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Sequence

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import ServeMetrics

UNMATCHED = "unmatched"
OPEN_PATHS = ("/health",)


def route_template(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The path template of the route `scope` goes to (`/score`), or `unmatched`: a bounded set of labels."""
    for route in routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            return getattr(route, "path", UNMATCHED)
    return UNMATCHED


def refusal(status: int, detail: str, **headers: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers or None)


class RequestMetrics:
    """Counts every answer (`ServeMetrics.observe_request`) by route template and status; an exception is a 500."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics, routes: Sequence[BaseRoute]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = route_template(self.routes, scope)
        started, status = time.perf_counter(), None

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except Exception:
            status = status or 500
            raise
        finally:
            if status is not None:
                self.metrics.observe_request(endpoint, status, time.perf_counter() - started)


class BearerAuth:
    """Refuses (401) every request but those to `open_paths` that does not carry `Authorization: Bearer <api_key>`;
    tokens are compared in constant time, from the headers alone."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: Sequence[str] = OPEN_PATHS):
        self.app, self.open_paths = app, tuple(open_paths)
        self.expected = f"Bearer {api_key}".encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
        if not hmac.compare_digest(given, self.expected):
            response = refusal(
                401,
                "Missing or wrong bearer token: send `Authorization: Bearer <token>`.",
                **{"WWW-Authenticate": "Bearer"},
            )
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


class ConcurrencyLimit:
    """At most `max_concurrent` POST requests in the app at once; past it, 503 with `Retry-After` (body unread)."""

    def __init__(self, app: ASGIApp, max_concurrent: int):
        self.app, self.max_concurrent = app, max_concurrent
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if self.active >= self.max_concurrent:
            response = refusal(
                503,
                f"The server is handling {self.active} requests, its most (--max_concurrent_requests); retry later.",
                **{"Retry-After": "1"},
            )
            return await response(scope, receive, send)
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


class BodyLimits:
    """
    A request body of at most `max_bytes`, counted as it arrives (chunked or not; a larger `Content-Length` is refused
    before any byte is read), arriving in full within `timeout_s` of the headers: else 413 or 408 (an `HTTPException`
    raised where the body is read, which the app answers in JSON). Starlette's own body limit answers in plain text
    and replaces any other answer to a request it judges too large, so the server counts bytes here.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    def too_large(self, size: str) -> HTTPException:
        return HTTPException(
            status_code=413,
            detail=f"The request body has {size} bytes; this server takes at most {self.max_bytes} "
            "(--max_request_bytes).",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            error = self.too_large(declared)
            return await refusal(error.status_code, error.detail)(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline, received, finished = loop.time() + self.timeout_s, 0, False

        async def receive_limited() -> Message:
            nonlocal received, finished
            if finished:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                raise HTTPException(
                    status_code=408,
                    detail=f"The request body did not arrive within {self.timeout_s:g} s (--body_timeout_s).",
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self.too_large(f"at least {received}")
            finished = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, receive_limited, send)


def header_timeout_protocol(timeout_s: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request line and headers do not arrive within `timeout_s`
    of its opening or of the last answer (see the module docstring); pass it as `uvicorn.Config(http=...)`."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _cycle_before = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._await_headers()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._header_timer is not None and self.cycle is not self._cycle_before:
                self._stop_header_timer()  # a request's headers arrived

        def on_response_complete(self) -> None:
            cycle = self.cycle
            super().on_response_complete()
            if self.cycle is cycle and not self.transport.is_closing():
                self._await_headers()

        def connection_lost(self, exc) -> None:
            self._stop_header_timer()
            super().connection_lost(exc)

        def _await_headers(self) -> None:
            self._stop_header_timer()
            self._cycle_before = self.cycle
            self._header_timer = self.loop.call_later(timeout_s, self._headers_too_late)

        def _stop_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_late(self) -> None:
            self._header_timer = None
            if self.cycle is self._cycle_before and not self.transport.is_closing():
                self.logger.debug("Closing a connection: no request headers within %g s.", timeout_s)
                self.transport.close()

    return HeaderTimeoutProtocol
