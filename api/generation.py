"""One real-time generation call: validate -> resolve + tokenize -> queue -> wait or stream.

Shared by /v1/chat/completions and /v1/completions; they differ only in the response builders.
A call is one generation request per choice (n per prompt, api/fanout.py); with one prompt and
n=1, exactly one. Every refusal happens before queueing (400 too long, 404 unknown model, 429 queue
full, 503 no worker), and a client that goes away cancels its requests, queued or running.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from api.boundary import redis_unavailable
from api.errors import APIError, envelope
from api.fanout import FanOut, expand, usage_of
from api.streaming import ChunkMaker
from hotswap import openai_schemas as oa
from hotswap.base_model import context_limit
from hotswap.openai_logprobs import MissingLogprobs, answer
from hotswap.openai_schemas import CompletionRequest
from hotswap.prompts import PromptError, check_counts
from hotswap.protocol import FAILURE_STATUS, GenerationResult
from scheduler.aio import live_workers
from scheduler.prepare import PrepareError, ServedModel, build_requests
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


def _fanout_limits(body, settings) -> None:
    prompts = len(body.prompts) if isinstance(body, CompletionRequest) else 1
    try:
        check_counts(prompts, body.choices_per_prompt, max_prompts=settings.max_prompts_per_request,
                     max_n=settings.max_n)
    except PromptError as exc:
        raise APIError(400, exc.message, param=exc.param) from None


async def prepare_and_submit(request: Request, body, tenant: str) -> FanOut:
    """Every choice of the call queued (api/fanout.py), or an APIError and nothing queued."""
    state, settings = request.app.state, request.app.state.settings
    _fanout_limits(body, settings)
    served = await served_model(request)
    try:
        per_prompt = await run_in_threadpool(build_requests, body, tenant, served, state.registry)
    except PrepareError as exc:
        raise APIError(exc.status, exc.message, param=exc.param, code=exc.code) from None
    fan = FanOut(state.aqueues, expand(per_prompt, body.choices_per_prompt))
    try:
        await fan.submit(cap=settings.max_queued_realtime, tenant_cap=settings.max_queued_per_tenant)
    except QueueFull as exc:
        raise APIError(429, f"{exc}; retry in a moment", code="queue_full", headers={"Retry-After": "2"}) from None
    return fan


def _failure(result: GenerationResult) -> APIError:
    error = result.error or {}
    code = error.get("code", "server_error")
    return APIError(FAILURE_STATUS.get(code, 500), error.get("message", "the request failed"), code=code)


def _first_failure(results: list[GenerationResult | None]) -> GenerationResult | None:
    return next((r for r in results if r is not None and r.status == "failed"), None)


async def respond(request: Request, body, kind: Kind, tenant: str):
    fan = await prepare_and_submit(request, body, tenant)
    first = fan.reqs[0]
    response_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + first.id.removeprefix("req_")
    n = body.choices_per_prompt
    tokenizer = request.app.state.served_base.tokenizer  # names the tokens in logprobs, and echoes prompts
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = ChunkMaker(kind, fan.reqs, response_id, include_usage, tokenizer)
        return StreamingResponse(_sse(fan, n, kind, chunks),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    results = await _wait(request, fan)
    if results is None:  # the client left; nobody reads this
        return JSONResponse(envelope(499, "client closed the request"), status_code=499)
    failed = _first_failure(results)
    if failed is not None:
        raise _failure(failed)
    try:
        answers = [answer(kind, req, r, tokenizer) for req, r in zip(fan.reqs, results)]
    except MissingLogprobs as exc:
        log.error("%s", exc)
        raise APIError(500, "the worker that ran this request did not report logprobs (an older version?); "
                            "retry", code="server_error") from None
    build = oa.chat_choices if kind == "chat" else oa.completion_choices
    return build(response_id, first.model, int(first.created_at), [(a.text, a.finish_reason) for a in answers],
                 *usage_of(results, n), logprobs=[a.logprobs for a in answers])


async def _wait(request: Request, fan: FanOut) -> list[GenerationResult] | None:
    """Every choice's result; None if the client left. The first failure ends the wait (the
    other choices are cancelled), as do a gone client and the timeout: nothing is left running."""
    deadline = time.monotonic() + request.app.state.settings.request_timeout_s
    try:
        async for item in fan.follow():
            if fan.done or _first_failure(fan.results) is not None:
                return fan.results
            if item is not None and not isinstance(item[1], GenerationResult):
                continue  # streamed text of a non-streaming call: only results matter here
            if await request.is_disconnected():
                return None
            if time.monotonic() > deadline:
                raise APIError(504, "timed out waiting for a worker; the request was cancelled", code="timeout")
        return fan.results
    finally:
        await fan.cancel_unfinished()


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _sse(fan: FanOut, n: int, kind: Kind, chunks: ChunkMaker) -> AsyncIterator[str]:
    """Chunks of every choice, interleaved as they come, each with its choice `index`; then one
    usage chunk (stream_options.include_usage) and [DONE] once all have finished. A failed choice
    ends the stream with its error (the others are cancelled)."""
    first = fan.reqs[0]
    try:
        try:
            for body in chunks.opening():
                yield _event(body)
            async for item in fan.follow():
                if item is None:
                    continue  # a quiet second; a gone client surfaces as cancellation of this generator
                index, got = item
                if not isinstance(got, GenerationResult):
                    for body in chunks.delta(index, got):
                        yield _event(body)
                    continue
                if got.status == "failed":
                    failure = _failure(got)
                    yield _event(envelope(failure.status, failure.message, code=failure.code))
                    break
                for body in chunks.finish(index, got):
                    yield _event(body)
                if fan.done:
                    if chunks.include_usage:
                        prompt, completion, cached = usage_of(fan.results, n)
                        yield _event(oa.usage_chunk(chunks.id, chunks.model, chunks.created, prompt, completion,
                                                    kind=kind, cached_tokens=cached))
                    break
        except Exception as exc:  # noqa: BLE001 - the status is sent: the stream itself says what happened
            log.exception("stream of %s failed", first.id)
            status, message = ((503, "lost the connection to the queue store; retry") if redis_unavailable(exc)
                               else (500, "internal error: the server logged the details"))
            yield _event(envelope(status, message, code="stream_failed"))
        yield "data: [DONE]\n\n"
    finally:
        # The client disconnected mid-stream, a choice failed, or the stream broke: stop the rest.
        await fan.cancel_unfinished()
