"""One request's state inside the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from worker.engine.logprobs import TokenLogprob
from worker.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity: a request is itself, whatever its fields
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int  # engine-wide order, for FCFS and preemption choice
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    generator: torch.Generator | None = None  # per-request RNG when seeded
    num_preemptions: int = 0
    adapter: str | None = None  # LoRA adapter name, None = the base model
    finetune: str | None = None  # full fine-tune whose weights this request needs, None = base
    lora_slot: int = -1  # GPU slot of the adapter while running, -1 = none
    # Prefix caching (prefix_cache.py): the weights identity the keys were made under, the keys of
    # the sequence's full blocks so far, and how many prompt tokens came from the cache when the
    # request was first admitted (None until then).
    weights_id: tuple[str, str | None] | None = None
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_tokens: int | None = None
    # Prompt logprobs (SamplingParams.prompt_logprobs), collected across prefill chunks: entry p is
    # prompt token p given tokens [0, p); entry 0 is None. Complete once it has one entry per prompt
    # token; a recompute after preemption only adds the entries still missing.
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    prompt_logprobs_sent: bool = False  # handed out with the request's first output

    def __post_init__(self):
        if self.params.prompt_logprobs is not None and not self.prompt_logprobs:
            self.prompt_logprobs = [None]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def needs_prompt_logits(self) -> bool:
        """Whether prompt positions still need their logits (so its prefill must compute them all)."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids)

    def prompt_logit_positions(self, start: int, num_tokens: int) -> range:
        """Positions in [start, start + num_tokens) whose logits give prompt logprobs not yet collected:
        the logits at position q score prompt token q + 1."""
        if not self.needs_prompt_logits:
            return range(0)
        lo = max(len(self.prompt_logprobs) - 1, start)
        hi = min(start + num_tokens, len(self.prompt_token_ids) - 1)
        return range(lo, max(lo, hi))

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without joining the two lists."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:n] + self.output_token_ids[max(start - n, 0):end - n]

    def token_at(self, position: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]
