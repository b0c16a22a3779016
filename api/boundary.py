"""Two ASGI middlewares around every request: a size limit on the body, and the error boundary.

- `BodyLimit` refuses a body over its route's limit before reading it (Content-Length), or as soon
  as a chunked body runs over, with a 413 in the error envelope: refusing costs the same whatever
  the size sent.
- `ErrorBoundary` turns any exception that escaped a route into that request's own answer: a 400
  for a lone surrogate that slipped past validation into a UTF-8 encoder, a 503 with Retry-After
  when Redis is unreachable (a restart, a failover), else a logged 500. It never
  re-raises, so the server keeps the connection and every other request untouched (Starlette's
  catch-all handler re-raises after answering, and uvicorn then drops the keep-alive connection).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import envelope

log = logging.getLogger("hotswap.api")


class BodyTooLarge(HTTPException):
    """Raised from `receive`: FastAPI re-raises HTTPExceptions met while reading a body, so this
    reaches the app's handler (a 413 envelope) instead of becoming "error parsing the body"."""

    def __init__(self, message: str):
        super().__init__(status_code=413, detail=message)


async def _send_json(send: Send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    head += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": raw})


class BodyLimit:
    """`limit_for(method, path)` -> (bytes allowed, what to tell the caller) or None for no limit."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str, str], tuple[int, str] | None]):
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rule = self.limit_for(scope["method"], scope["path"]) if scope["type"] == "http" else None
        if rule is None:
            return await self.app(scope, receive, send)
        limit, advice = rule
        length = _content_length(scope)
        if length is not None and length > limit:
            message = f"request body of {length:,} bytes exceeds this server's limit of {limit:,} bytes; {advice}"
            return await _send_json(send, 413, envelope(413, message, code="request_too_large"))
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(f"request body exceeds this server's limit of {limit:,} bytes; {advice}")
            return message

        await self.app(scope, limited, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class ErrorBoundary:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception as exc:  # noqa: BLE001 - this is the boundary: nothing escapes one request
            where = f"{scope['method']} {scope['path']}"
            if isinstance(exc, HTTPException) and not started:  # raised outside the routes' handlers
                return await _send_json(send, exc.status_code, envelope(exc.status_code, str(exc.detail)))
            if started:  # the status is sent; the stream's own handler should have ended it cleanly
                log.exception("%s failed after its response started", where)
                return
            if isinstance(exc, UnicodeEncodeError) and "surrogate" in exc.reason:  # a client's text we missed
                log.warning("%s: lone surrogate reached %s", where, exc)
                return await _send_json(send, 400, envelope(400, "the request holds a lone UTF-16 surrogate; send "
                                                                  "valid Unicode", code="invalid_unicode"))
            if redis_unavailable(exc):
                log.warning("%s: Redis unavailable: %s", where, exc)
                return await _send_json(send, 503, envelope(503, "the queue store is unreachable right now; retry in "
                                                                  "a few seconds", code="redis_unavailable"),
                                        {"Retry-After": "2"})
            log.exception("%s: unhandled error", where)
            await _send_json(send, 500, envelope(500, "internal error: the server logged the details",
                                                 code="internal_error"))


def redis_unavailable(exc: BaseException) -> bool:
    from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError

    return isinstance(exc, (ConnectionError, TimeoutError, BusyLoadingError))
