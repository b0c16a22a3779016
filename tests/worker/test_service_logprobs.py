"""The worker service's side of logprobs: the SamplingSpec fields reach the engine, and the engine's
entries become the protocol's compact, JSON-safe ones."""

from __future__ import annotations

import json
import math

from hotswap.protocol import GenerationRequest, ModelTarget, SamplingSpec
from worker.engine.logprobs import TokenLogprob
from worker.service import WorkerService, compact_logprob


def req(**sampling) -> GenerationRequest:
    return GenerationRequest(tenant="t", base_model="b", model="b", target=ModelTarget(kind="base"),
                             prompt_token_ids=[1, 2], sampling=SamplingSpec(**sampling))


def test_logprobs_fields_reach_the_engine_and_max_tokens_0_runs_one_token():
    params = WorkerService._sampling(req(max_tokens=3, logprobs=2, prompt_logprobs=0))
    assert (params.max_tokens, params.logprobs, params.prompt_logprobs) == (3, 2, 0)
    off = WorkerService._sampling(req(max_tokens=3))
    assert (off.logprobs, off.prompt_logprobs) == (None, None)
    scoring = WorkerService._sampling(req(max_tokens=0, logprobs=1, prompt_logprobs=1))
    assert scoring.max_tokens == 1  # the engine makes one token; the service reports none of it


def test_compact_entries_are_finite_json():
    entry = TokenLogprob(7, -float("inf"), [(3, -0.5), (9, float("nan")), (7, -float("inf"))])
    got = compact_logprob(entry)
    assert got == (7, -9999.0, [(3, -0.5), (9, -9999.0), (7, -9999.0)])
    assert json.loads(json.dumps(got, allow_nan=False)) == [7, -9999.0, [[3, -0.5], [9, -9999.0], [7, -9999.0]]]
    assert compact_logprob(None) is None
    value = -0.123456789  # a float32 value, widened: the very same float comes back out of JSON
    exact = compact_logprob(TokenLogprob(1, value, [(1, value)]))
    assert json.loads(json.dumps(exact))[1] == value and not math.isnan(exact[1])
