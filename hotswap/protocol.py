"""What the API, the scheduler and the workers say to each other about one generation request.

A request is written to Redis once, as JSON of `GenerationRequest`, and never changes; its state
(queued, running, done ...) lives beside it (see `hotswap/keys.py`). A worker streams
`TokenEvent`s into the request's Redis stream and records one `GenerationResult`.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, Field

Priority = Literal["realtime", "batch"]
ModelKind = Literal["base", "lora", "full"]

PRIORITIES: tuple[Priority, ...] = ("realtime", "batch")


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


class ModelTarget(BaseModel):
    """Which weights a request runs on. `key` names the scheduler queue and is what workers hold."""

    kind: ModelKind
    ref: str | None = None  # "tenant/name@version" of a registered adapter or fine-tune; None for the base
    digest: str | None = None  # content digest of the registered files (the worker's cache key)

    @property
    def key(self) -> str:
        return "base" if self.kind == "base" else f"{self.kind}:{self.ref}"

    @property
    def weights(self) -> str:
        """The full weights the worker must have resident: the base, or one full fine-tune."""
        return self.key if self.kind == "full" else "base"

    @classmethod
    def from_key(cls, key: str) -> "ModelTarget":
        if key == "base":
            return cls(kind="base")
        kind, _, ref = key.partition(":")
        return cls(kind=kind, ref=ref)


# One token's log-probability as workers report it, compact for Redis: [token id, logprob, [[alternative
# id, logprob], ...]], the alternatives best first (the top k asked for; the token itself among them
# when it is one of the k, with the very same float). Logprobs are finite: -inf is sent as -9999.0.
LogprobEntry = tuple[int, float, list[tuple[int, float]]]


class SamplingSpec(BaseModel):
    # 0: score the prompt only (completions' echo with max_tokens 0): the worker runs the engine for
    # one token and reports none of it, so the result has only the prompt's logprobs.
    max_tokens: int = Field(ge=0)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    ignore_eos: bool = False
    # Output controls; the defaults mean "off", so requests written before they existed still parse.
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[int] = Field(default_factory=list)
    guided: dict | None = None  # structured output: hotswap.structured.GuidedSpec.as_dict()
    # Log-probabilities of the raw logits: None = off; k = each token's own plus its top k alternatives.
    logprobs: int | None = Field(default=None, ge=0, le=20)  # per generated token
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)  # per prompt token (the first has none)


class GenerationRequest(BaseModel):
    id: str = Field(default_factory=new_request_id)
    tenant: str
    base_model: str
    model: str  # the name the client used, echoed in responses
    target: ModelTarget
    prompt_token_ids: list[int]
    sampling: SamplingSpec
    priority: Priority = "realtime"
    stream: bool = False  # stream token events (real-time streaming calls); otherwise only the result
    created_at: float = Field(default_factory=time.time)
    batch_id: str | None = None  # set for lines of a batch job
    custom_id: str | None = None
    echo: bool = False  # completions' echo: the answer starts with the prompt (the API's concern; workers ignore it)


class TokenEvent(BaseModel):
    """One entry of a request's output stream. `attempt` changes when a request is rerun after a
    worker crash; `offset` is where `text` starts in that attempt's output, so a reader that already
    passed it can skip what it has seen."""

    attempt: int
    offset: int
    text: str
    token_ids: list[int]
    # With SamplingSpec.logprobs: one entry per token of token_ids; `token_offset` is how many tokens
    # this attempt produced before them, so a reader skips entries it has passed on, as it does text.
    logprobs: list[LogprobEntry] | None = None
    token_offset: int = 0
    # With SamplingSpec.prompt_logprobs: in the attempt's first event only, one entry per prompt token
    # (the first None).
    prompt_logprobs: list[LogprobEntry | None] | None = None


# A failed request's error code -> the HTTP status it answers with (live, and in a batch's error file).
FAILURE_STATUS = {"invalid_request": 400, "model_unavailable": 503, "dead_letter": 500}


class GenerationResult(BaseModel):
    id: str
    status: Literal["completed", "failed", "cancelled"]
    text: str = ""
    token_ids: list[int] = Field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, those whose KV the engine's prefix cache held
    completion_tokens: int = 0
    logprobs: list[LogprobEntry] | None = None  # one per token of token_ids, with SamplingSpec.logprobs
    prompt_logprobs: list[LogprobEntry | None] | None = None  # one per prompt token (the first None), if asked
    error: dict | None = None  # {"code", "message"} when status is "failed"
    worker: str | None = None
    attempts: int = 0
    queued_at: float = 0.0
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float = Field(default_factory=time.time)
