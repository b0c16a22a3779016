"""One real-time generation call: validate -> resolve + tokenize -> queue -> wait or stream.

Shared by /v1/chat/completions and /v1/completions; they differ only in the response builders.
Every refusal happens before queueing (400 too long, 404 unknown model, 429 queue full, 503 no
worker), and a client that goes away cancels its request, queued or running.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Literal

import anyio
from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from api.boundary import redis_unavailable
from api.errors import APIError, envelope
from hotswap import openai_schemas as oa
from hotswap.base_model import context_limit
from hotswap.protocol import FAILURE_STATUS, GenerationRequest, GenerationResult
from scheduler.aio import live_workers
from scheduler.prepare import PrepareError, ServedModel, build_request
from scheduler.queues import QueueFull

log = logging.getLogger("hotswap.api")

Kind = Literal["chat", "completion"]


async def served_model(request: Request) -> ServedModel:
    """The base model and the context length every live worker accepts; 503 when none runs."""
    state, settings = request.app.state, request.app.state.settings
    if state.served_base is None:
        raise APIError(503, state.served_base_missing, code="model_files_missing")
    workers = await live_workers(state.aredis, settings.base_model)
    if not workers:
        raise APIError(503, f"no worker is serving {settings.base_model!r} right now; start one with `hotswap worker` "
                            "(or wait for a restarting one) and retry", code="no_worker", headers={"Retry-After": "5"})
    limit = context_limit([w.max_model_len for w in workers], state.served_base.config_len)
    return ServedModel(settings.base_model, state.served_base.tokenizer, limit)


async def prepare_and_submit(request: Request, body, tenant: str) -> GenerationRequest:
    state, settings = request.app.state, request.app.state.settings
    served = await served_model(request)
    try:
        req = await run_in_threadpool(build_request, body, tenant, served, state.registry)
    except PrepareError as exc:
        raise APIError(exc.status, exc.message, param=exc.param, code=exc.code) from None
    try:
        await state.aqueues.submit(req, cap=settings.max_queued_realtime, tenant_cap=settings.max_queued_per_tenant)
    except QueueFull as exc:
        raise APIError(429, f"{exc}; retry in a moment", code="queue_full", headers={"Retry-After": "2"}) from None
    return req


def _failure(result: GenerationResult) -> APIError:
    error = result.error or {}
    code = error.get("code", "server_error")
    return APIError(FAILURE_STATUS.get(code, 500), error.get("message", "the request failed"), code=code)


def _finish_reason(result: GenerationResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


async def respond(request: Request, body, kind: Kind, tenant: str):
    req = await prepare_and_submit(request, body, tenant)
    response_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + req.id.removeprefix("req_")
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(request, req, kind, response_id, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    result = await _wait(request, req)
    if result is None:  # the client left; nobody reads this
        return JSONResponse(envelope(499, "client closed the request"), status_code=499)
    if result.status == "failed":
        raise _failure(result)
    build = oa.chat_completion if kind == "chat" else oa.completion
    return build(response_id, req.model, int(req.created_at), result.text, _finish_reason(result),
                 result.prompt_tokens, result.completion_tokens, result.cached_tokens)


async def _wait(request: Request, req: GenerationRequest) -> GenerationResult | None:
    aqueues = request.app.state.aqueues
    deadline = time.monotonic() + request.app.state.settings.request_timeout_s
    async for item in aqueues.follow(req.id):
        if isinstance(item, GenerationResult):
            return item
        if await request.is_disconnected():
            await aqueues.cancel(req.id)
            return None
        if time.monotonic() > deadline:
            await aqueues.cancel(req.id)
            raise APIError(504, "timed out waiting for a worker; the request was cancelled", code="timeout")
    return None


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _sse(request: Request, req: GenerationRequest, kind: Kind, response_id: str,
               include_usage: bool) -> AsyncIterator[str]:
    aqueues = request.app.state.aqueues
    created = int(req.created_at)

    def chunk(text: str | None = None, finish: str | None = None, first: bool = False) -> dict:
        if kind == "chat":
            return oa.chat_chunk(response_id, req.model, created, delta_text=text, role="assistant" if first else None,
                                 finish_reason=finish, include_usage=include_usage)
        return oa.completion_chunk(response_id, req.model, created, text=text or "", finish_reason=finish,
                                   include_usage=include_usage)

    finished = False
    try:
        try:
            if kind == "chat":
                yield _event(chunk(first=True))
            async for item in aqueues.follow(req.id):
                if item is None:
                    continue  # a quiet second; a gone client surfaces as cancellation of this generator
                if isinstance(item, str):
                    if item:
                        yield _event(chunk(item))
                    continue
                finished = True
                if item.status == "failed":
                    failure = _failure(item)
                    yield _event(envelope(failure.status, failure.message, code=failure.code))
                else:
                    yield _event(chunk(finish=_finish_reason(item)))
                    if include_usage:
                        yield _event(oa.usage_chunk(response_id, req.model, created, item.prompt_tokens,
                                                    item.completion_tokens, kind=kind,
                                                    cached_tokens=item.cached_tokens))
                break
        except Exception as exc:  # noqa: BLE001 - the status is sent: the stream itself says what happened
            log.exception("stream of %s failed", req.id)
            status, message = ((503, "lost the connection to the queue store; retry") if redis_unavailable(exc)
                               else (500, "internal error: the server logged the details"))
            yield _event(envelope(status, message, code="stream_failed"))
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client disconnected mid-stream, or the stream failed: stop the work
            with anyio.CancelScope(shield=True):  # this task may be being cancelled: shield the one call
                try:
                    await aqueues.cancel(req.id)
                except Exception:  # noqa: BLE001 - Redis gone too: the request's lease ends it
                    log.warning("could not cancel %s", req.id, exc_info=True)
