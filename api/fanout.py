"""One real-time call answered by several generation requests: n > 1, and several prompts.

Every choice is its own `GenerationRequest`, queued, run, streamed and recovered after a worker
crash like any other. vLLM V1 answers n > 1 the same way (n child requests of one parent) and
relies on prefix caching so the shared prompt costs one prefill: the worker engine's prefix cache
computes the prompt's full blocks once (a sequence whose next block another is computing waits
to hit it), and the sequences share them by reference count. So neither the scheduler nor the
worker needs to know about choices.

Choices are ordered prompt-major, as OpenAI and vLLM do: index = prompt_i * n + j. The pure parts
(`expand`, `choice_seed`, `usage_of`) are policy; `FanOut` submits, follows and cancels as one.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import anyio

from hotswap.protocol import GenerationRequest, GenerationResult, new_request_id
from scheduler.aio import Delta

log = logging.getLogger("hotswap.api")

_INT64 = 2**64


def choice_seed(seed: int | None, j: int) -> int | None:
    """The seed of choice j: the request's own for the first (so n=1 and choice 0 agree), then
    seed + j as vLLM does, wrapped into the signed 64-bit range the workers' generators take.
    Distinct for every j, so seeded samples differ yet repeat exactly on a rerun."""
    if seed is None or j == 0:
        return seed
    return (seed + j + _INT64 // 2) % _INT64 - _INT64 // 2


def expand(per_prompt: list[GenerationRequest], n: int) -> list[GenerationRequest]:
    """n requests per prompt, prompt-major; copies get their own id and their choice's seed."""
    out = []
    for req in per_prompt:
        for j in range(n):
            if j == 0:
                out.append(req)
                continue
            sampling = req.sampling.model_copy(update={"seed": choice_seed(req.sampling.seed, j)})
            out.append(req.model_copy(update={"id": new_request_id(), "sampling": sampling}))
    return out


def usage_of(results: list[GenerationResult], n: int) -> tuple[int, int, int]:
    """(prompt_tokens, completion_tokens, cached_tokens) of a call, as OpenAI counts n > 1: each
    prompt once, every choice's completion. Cached tokens are counted once per prompt too (the
    fewest any of its choices had: what the cache held before this call), so they stay a part
    of prompt_tokens; a sum over choices would exceed it."""
    prompt = completion = cached = 0
    for start in range(0, len(results), n):
        group = results[start:start + n]
        prompt += group[0].prompt_tokens
        cached += min(r.cached_tokens for r in group)
        completion += sum(r.completion_tokens for r in group)
    return prompt, completion, cached


class FanOut:
    """The requests of one call, choice i = reqs[i]: submitted, followed and cancelled together."""

    def __init__(self, aqueues, reqs: list[GenerationRequest]):
        self.aqueues, self.reqs = aqueues, reqs
        self.results: list[GenerationResult | None] = [None] * len(reqs)
        self._submitted = 0

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.results)

    async def submit(self, *, cap: int, tenant_cap: int) -> None:
        """Queue every request; if one cannot be (queue full, Redis gone), the ones already queued
        are cancelled and the error raised: a call is queued whole or not at all."""
        try:
            for req in self.reqs:
                await self.aqueues.submit(req, cap=cap, tenant_cap=tenant_cap)
                self._submitted += 1
        except BaseException:
            await self.cancel_unfinished()
            raise

    async def follow(self) -> AsyncIterator[tuple[int, Delta | GenerationResult] | None]:
        """(choice, delta) and (choice, result) as they come, interleaved; None on a quiet second."""
        async for item in self.aqueues.follow_many([r.id for r in self.reqs]):
            if item is not None and isinstance(item[1], GenerationResult):
                self.results[item[0]] = item[1]
            yield item

    async def cancel_unfinished(self) -> None:
        """Cancel every queued request without a result: the client left, one choice failed, or the
        call timed out. Shielded, since the caller may itself be being cancelled; a cancel that
        fails (Redis gone) is logged, and the request's lease ends it."""
        with anyio.CancelScope(shield=True):
            for req, result in zip(self.reqs[:self._submitted], self.results):
                if result is not None:
                    continue
                try:
                    await self.aqueues.cancel(req.id)
                except Exception:  # noqa: BLE001 - see the docstring
                    log.warning("could not cancel %s", req.id, exc_info=True)
