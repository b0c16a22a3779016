"""The API's asyncio view of the queues: submit, cancel, follow a request's output, find workers.

Same scripts and keys as `scheduler.queues` (the sync side used by the dispatcher and workers).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from hotswap.protocol import GenerationRequest, GenerationResult, LogprobEntry, TokenEvent
from hotswap import keys
from scheduler import lua
from scheduler.queues import check_enqueued, enqueue_args
from scheduler.workers import WorkerInfo


@dataclass
class Delta:
    """What a request produced since the reader's last delta: text, and when it asked for them the
    logprobs of its new tokens (and, once, of its prompt)."""

    text: str
    logprobs: list[LogprobEntry] | None = None
    prompt_logprobs: list[LogprobEntry | None] | None = None


class AsyncQueues:
    def __init__(self, aredis, *, result_ttl_s: int):
        self.redis = aredis
        self.ttl = result_ttl_s
        self._enqueue = aredis.register_script(lua.ENQUEUE)
        self._cancel = aredis.register_script(lua.CANCEL)

    async def submit(self, req: GenerationRequest, *, cap: int = 0, tenant_cap: int = 0) -> None:
        check_enqueued(await self._enqueue(args=enqueue_args(req, cap, tenant_cap)), req, cap, tenant_cap)

    async def cancel(self, request_id: str, tenant: str | None = None) -> str:
        answer = await self._cancel(args=[request_id, tenant or "", self.ttl, time.time()])
        return keys.text(answer)

    async def follow(self, request_id: str, *, block_ms: int = 1000) -> AsyncIterator[Delta | GenerationResult | None]:
        """Deltas as the request produces them, then its `GenerationResult`. Yields None after each
        `block_ms` without news, so the caller can check its client is still there."""
        async for item in self.follow_many([request_id], block_ms=block_ms):
            yield None if item is None else item[1]

    async def follow_many(self, request_ids: list[str], *,
                          block_ms: int = 1000) -> AsyncIterator[tuple[int, Delta | GenerationResult] | None]:
        """(i, delta) of request_ids[i] as the requests produce output, and (i, result) once each ends;
        returns when all have. One XREAD over every stream that is still open, so n choices hold one
        Redis connection, not n. Yields None after each `block_ms` without news.

        After a worker crash a request reruns from the start (attempt + 1); text and token logprobs
        this reader already passed on are skipped by offset, so a client never sees a repeat."""
        index = {keys.output(rid): i for i, rid in enumerate(request_ids)}
        last = {stream: "0-0" for stream in index}  # the open streams, and where each was read up to
        sent = [0] * len(request_ids)  # characters passed on, per request
        sent_tokens = [0] * len(request_ids)  # token logprobs passed on
        prompt_sent = [False] * len(request_ids)
        while last:
            got = await self.redis.xread(last, block=block_ms, count=256)
            if not got:
                yield None
                continue
            for raw_stream, entries in got:
                stream = keys.text(raw_stream)
                i = index[stream]
                for entry_id, fields in entries:
                    last[stream] = entry_id
                    if b"result" in fields:
                        del last[stream]
                        yield i, GenerationResult.model_validate_json(fields[b"result"])
                        break
                    event = TokenEvent.model_validate_json(fields[b"event"])
                    delta = Delta("")
                    end = event.offset + len(event.text)
                    if end > sent[i]:
                        delta.text = event.text[max(0, sent[i] - event.offset):]
                        sent[i] = end
                    tokens_end = event.token_offset + len(event.logprobs or [])
                    if event.logprobs and tokens_end > sent_tokens[i]:
                        delta.logprobs = event.logprobs[max(0, sent_tokens[i] - event.token_offset):]
                        sent_tokens[i] = tokens_end
                    if event.prompt_logprobs is not None and not prompt_sent[i]:
                        delta.prompt_logprobs, prompt_sent[i] = event.prompt_logprobs, True
                    if delta.text or delta.logprobs or delta.prompt_logprobs is not None:
                        yield i, delta


async def live_workers(aredis, base_model: str) -> list[WorkerInfo]:
    """Registered workers of `base_model` whose lease holds (not draining)."""
    raw = await aredis.hgetall(keys.WORKERS)
    infos = [WorkerInfo.model_validate_json(v) for v in raw.values()]
    infos = [w for w in infos if w.base_model == base_model and not w.draining]
    if not infos:
        return []
    async with aredis.pipeline(transaction=False) as pipe:
        for w in infos:
            pipe.exists(keys.worker_alive(w.id))
        flags = await pipe.execute()
    return [w for w, ok in zip(infos, flags) if ok]
