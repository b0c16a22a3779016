"""api/fanout.py: the policy of n > 1 (seeds, order, usage) as pure functions, and `FanOut` on a
real Redis with the real queue scripts, a test playing the worker (claim, stream, complete)."""

from __future__ import annotations

import anyio
import pytest
import redis.asyncio

from api.fanout import FanOut, choice_seed, expand, usage_of
from hotswap import keys
from hotswap.protocol import GenerationRequest, GenerationResult, ModelTarget, SamplingSpec, TokenEvent
from scheduler.aio import AsyncQueues, Delta
from scheduler.queues import QueueFull, Queues

BASE = "tiny"
INT64_MAX = 2**63 - 1


def make_req(prompt=(1, 2, 3), seed=None, stream=True) -> GenerationRequest:
    return GenerationRequest(tenant="t1", base_model=BASE, model="base", target=ModelTarget(kind="base"),
                             prompt_token_ids=list(prompt), sampling=SamplingSpec(max_tokens=4, seed=seed),
                             stream=stream)


def result(req: GenerationRequest, status="completed", text="hi", completion_tokens=2, cached=0) -> GenerationResult:
    return GenerationResult(id=req.id, status=status, text=text, finish_reason="stop" if status == "completed" else None,
                            prompt_tokens=len(req.prompt_token_ids), completion_tokens=completion_tokens,
                            cached_tokens=cached, error={"code": "invalid_request", "message": "bad"}
                            if status == "failed" else None)


# -- policy -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 7, -5, INT64_MAX, -(2**63)])
def test_choice_seeds_are_distinct_reproducible_and_in_range(seed):
    seeds = [choice_seed(seed, j) for j in range(128)]
    assert seeds[0] == seed  # n=1 and choice 0 of n>1 sample alike
    assert len(set(seeds)) == 128 and seeds == [choice_seed(seed, j) for j in range(128)]
    assert all(-(2**63) <= s <= INT64_MAX for s in seeds)
    assert choice_seed(None, 3) is None  # unseeded choices draw from the engine's own randomness


def test_expand_is_prompt_major_with_own_ids_and_seeds():
    a, b = make_req((1, 2), seed=10), make_req((3,), seed=10)
    out = expand([a, b], 3)
    assert [r.prompt_token_ids for r in out] == [[1, 2]] * 3 + [[3]] * 3  # index = prompt_i * n + j
    assert out[0] is a and out[3] is b
    assert len({r.id for r in out}) == 6
    assert [r.sampling.seed for r in out] == [10, 11, 12] * 2
    assert all(r.sampling.max_tokens == 4 and r.created_at == a.created_at for r in out[:3])
    assert expand([a], 1) == [a]


def test_usage_counts_each_prompt_once():
    a, b = make_req((1, 2, 3)), make_req((4, 5))
    results = [result(a, completion_tokens=2, cached=0), result(a, completion_tokens=4, cached=3),
               result(b, completion_tokens=1, cached=2), result(b, completion_tokens=5, cached=2)]
    assert usage_of(results, 2) == (3 + 2, 2 + 4 + 1 + 5, 0 + 2)
    assert usage_of(results[:1], 1) == (3, 2, 0)


# -- FanOut on a real Redis -------------------------------------------------------------------------

def claim_all(queues: Queues, reqs: list[GenerationRequest], worker="w1") -> dict[str, int]:
    """Play the worker taking and claiming reqs: {request id: attempt} (what complete() needs)."""
    queues.redis.set(keys.worker_alive(worker), "1", px=60_000)
    taken = queues.take(keys.queue(BASE, "realtime", "base"), len(reqs), worker, 64)
    assert set(taken) == {r.id for r in reqs}
    attempts = {}
    for req in reqs:
        claimed = queues.claim(req.id, worker)
        assert claimed is not None
        attempts[req.id] = claimed[1]
    return attempts


def stream(queues: Queues, req: GenerationRequest, offset: int, text: str, token_offset: int = 0) -> None:
    event = TokenEvent(attempt=1, offset=offset, text=text, token_ids=[1], token_offset=token_offset)
    queues.redis.xadd(keys.output(req.id), {"event": event.model_dump_json()})


def run(redis_url, body):
    async def main():
        aredis = redis.asyncio.Redis.from_url(redis_url)
        try:
            return await body(AsyncQueues(aredis, result_ttl_s=60))
        finally:
            await aredis.aclose()
    return anyio.run(main)


def test_follow_interleaves_choices_and_ends_when_all_have(redis_url, redis_client):
    queues = Queues(redis_client, result_ttl_s=60)
    reqs = [make_req() for _ in range(3)]

    async def body(aq):
        fan = FanOut(aq, reqs)
        await fan.submit(cap=0, tenant_cap=0)
        attempts = claim_all(queues, reqs)
        stream(queues, reqs[2], 0, "c0")
        stream(queues, reqs[0], 0, "a0")
        stream(queues, reqs[2], 2, "c1", token_offset=1)  # a later token of a request without logprobs
        stream(queues, reqs[2], 0, "c0")  # a rerun after a crash repeats itself: skipped by offset
        for i in (1, 2, 0):
            assert queues.complete(result(reqs[i], text=f"t{i}"), "w1", attempts[reqs[i].id])
        got = [item async for item in fan.follow() if item is not None]
        return fan, got

    fan, got = run(redis_url, body)
    texts = [(i, x.text) for i, x in got if isinstance(x, Delta)]
    assert sorted(texts) == [(0, "a0"), (2, "c0"), (2, "c1")]
    assert [x for i, x in texts if i == 2] == ["c0", "c1"]  # each choice in its own order
    assert all(x.logprobs is None and x.prompt_logprobs is None for _, x in got if isinstance(x, Delta))
    assert fan.done and [r.text for r in fan.results] == ["t0", "t1", "t2"]


def test_follow_passes_each_token_logprob_and_the_prompt_logprobs_once(redis_url, redis_client):
    """Token logprobs are skipped by token offset as text is by character offset: a rerun after a
    crash repeats nothing; a token whose text is held back still passes its logprob on."""
    queues = Queues(redis_client, result_ttl_s=60)
    req = make_req()

    def push(attempt, offset, text, token, token_offset, prompt=None):
        event = TokenEvent(attempt=attempt, offset=offset, text=text, token_ids=[token], token_offset=token_offset,
                           logprobs=[(token, -1.0 / (token_offset + 1), [])], prompt_logprobs=prompt)
        queues.redis.xadd(keys.output(req.id), {"event": event.model_dump_json(exclude_defaults=True)})

    async def body(aq):
        fan = FanOut(aq, [req])
        await fan.submit(cap=0, tenant_cap=0)
        attempts = claim_all(queues, [req])
        prompt = [None, (2, -3.0, [(2, -3.0)]), (3, -0.5, [(3, -0.5)])]
        push(1, 0, "", 5, 0, prompt)  # its text held back (a possible stop string)
        push(1, 0, "ab", 6, 1)
        push(2, 0, "", 5, 0, prompt)  # the rerun repeats the first two tokens ...
        push(2, 0, "ab", 6, 1)
        push(2, 2, "c", 7, 2)  # ... then goes on
        assert queues.complete(result(req, text="abc"), "w1", attempts[req.id])
        return [x async for item in fan.follow() if item is not None for _, x in [item]]

    got = run(redis_url, body)
    deltas = [x for x in got if isinstance(x, Delta)]
    assert [d.text for d in deltas] == ["", "ab", "c"]
    assert [d.logprobs for d in deltas] == [[(5, -1.0, [])], [(6, -0.5, [])], [(7, -1 / 3, [])]]
    assert deltas[0].prompt_logprobs[0] is None and len(deltas[0].prompt_logprobs) == 3
    assert [d.prompt_logprobs for d in deltas[1:]] == [None, None]
    assert isinstance(got[-1], GenerationResult)


def test_cancel_unfinished_stops_every_other_choice(redis_url, redis_client):
    """One choice failed (or the client left): the others, queued or running, are cancelled; the
    finished ones are left alone."""
    queues = Queues(redis_client, result_ttl_s=60)
    reqs = [make_req() for _ in range(4)]

    async def body(aq):
        fan = FanOut(aq, reqs)
        await fan.submit(cap=0, tenant_cap=0)
        attempts = claim_all(queues, reqs[:2])  # two running, two still queued
        assert queues.complete(result(reqs[0], status="failed"), "w1", attempts[reqs[0].id])
        async for item in fan.follow():
            if item is not None and isinstance(item[1], GenerationResult):
                break
        await fan.cancel_unfinished()
        return fan

    fan = run(redis_url, body)
    assert fan.results[0].status == "failed"
    assert queues.state(reqs[0].id)["state"] == "failed"
    assert queues.pop_cancels("w1") == [reqs[1].id]  # the running one: its worker is told to stop
    assert [queues.state(r.id)["state"] for r in reqs[2:]] == ["cancelled", "cancelled"]
    assert queues.waiting("realtime") == 0


def test_a_call_is_queued_whole_or_not_at_all(redis_url, redis_client):
    queues = Queues(redis_client, result_ttl_s=60)
    reqs = [make_req() for _ in range(3)]

    async def body(aq):
        fan = FanOut(aq, reqs)
        with pytest.raises(QueueFull):
            await fan.submit(cap=0, tenant_cap=2)

    run(redis_url, body)
    assert queues.waiting("realtime") == 0
    assert [queues.state(r.id).get("state") for r in reqs[:2]] == ["cancelled", "cancelled"]
    assert queues.state(reqs[2].id) == {}  # never queued
