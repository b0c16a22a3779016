"""The per-step planner: which sequences run in the next engine step, and how many tokens each.

Continuous batching: sequences join and leave between steps. Every running sequence that is
decoding gets one token; what is left of the token budget goes to prompt chunks (chunked
prefill), running ones first, then waiting ones in arrival order. When the KV cache is full, the
newest running sequence is preempted: its blocks are freed and it recomputes later (no request is
lost, and greedy output is unchanged because recompute rebuilds the same KV).

With a prefix cache, a sequence being admitted (new, or resuming after preemption) starts after its
longest cached prefix: those blocks are shared, and the token budget counts only what is computed.
A sequence that still needs prompt logprobs takes no cache hits: it computes every prompt position.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from worker.engine.block_manager import BlockManager
from worker.engine.prefix_cache import PrefixCache
from worker.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens computed this step, from seq.num_computed_tokens on

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's end, so its last logits pick a new token."""
        return self.num_tokens == self.seq.num_uncomputed


@dataclass
class StepPlan:
    decodes: list[ScheduledChunk] = field(default_factory=list)  # one token each
    prefills: list[ScheduledChunk] = field(default_factory=list)  # chunks of several tokens
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def chunks(self) -> list[ScheduledChunk]:
        return self.decodes + self.prefills  # the packed token order of the step

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class AdapterSlots(Protocol):
    def acquire(self, name: str) -> int | None: ...
    def release(self, slot: int) -> None: ...


class Batcher:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 lora_slots: AdapterSlots | None = None, prefix_cache: PrefixCache | None = None):
        self.blocks = blocks
        self.prefix_cache = prefix_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.lora_slots = lora_slots
        self.current_finetune: str | None = None  # whose full weights are in the model now
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def needs_swap(self) -> bool:
        """Whether the oldest waiting request needs other full weights and nothing runs on the old
        ones any more: then swap to `waiting[0].finetune`. Swapping only for the oldest request
        means no request starves, and requests of one fine-tune run together."""
        return not self.running and bool(self.waiting) and self.waiting[0].finetune != self.current_finetune

    def swap_target(self) -> str | None:
        """The full weights the oldest waiting request needs (None: the base model's)."""
        return self.waiting[0].finetune

    def swapped_to(self, finetune: str | None) -> None:
        self.current_finetune = finetune

    def plan(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_num_batched_tokens
        # 1. Running sequences, oldest first; preempt the newest when blocks run out.
        self.running.sort(key=lambda s: s.arrival)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            while not self.blocks.can_allocate(seq.block_table, seq.num_computed_tokens + n):
                victim = self.running[-1]
                if victim is seq:
                    break
                self._preempt(victim, plan)
            else:
                self.blocks.allocate(seq.block_table, seq.num_computed_tokens + n)
                self._add_chunk(plan, seq, n)
                budget -= n
                i += 1
                continue
            self._preempt(seq, plan)  # not even this one fits: it waits for others to finish
        if plan.preempted:
            return self._ordered(plan)  # memory is short: admitting newcomers now would only thrash
        # 2. Waiting sequences in arrival order, while the budget, seat count and blocks allow.
        #    Skipped for now: those needing other full weights, or an adapter with no free slot.
        #    When the oldest waiting request needs other weights, admit nobody: drain, then swap.
        if self.waiting and self.waiting[0].finetune != self.current_finetune:
            return self._ordered(plan)
        #    With a prefix cache, one whose next block another sequence is computing waits to hit it.
        in_flight = None
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            if seq.finetune != self.current_finetune:
                continue
            hits = []
            if self.prefix_cache:
                if in_flight is None:
                    in_flight = self.prefix_cache.in_flight(self.running)
                if seq.needs_prompt_logits:  # prompt logprobs need the logits of every prompt position
                    self.prefix_cache.bind(seq)
                else:
                    hits = self.prefix_cache.lookup(seq, in_flight)
                    if hits is None:
                        continue
            cached = len(hits) * self.blocks.block_size  # a waiting sequence has nothing computed
            n = min(seq.num_tokens - cached, budget)
            if not self.blocks.can_allocate(seq.block_table, cached + n, hits):
                break
            if seq.adapter is not None:
                slot = self.lora_slots.acquire(seq.adapter) if self.lora_slots else None
                if slot is None:
                    continue  # every slot busy with running adapters: wait for one to free up
                seq.lora_slot = slot
            self.waiting.remove(seq)
            self.blocks.allocate(seq.block_table, cached + n, hits)
            seq.num_computed_tokens = cached
            if seq.num_cached_tokens is None:  # first admission: what the request saved
                seq.num_cached_tokens = cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if in_flight is not None:
                self.prefix_cache.add_in_flight(in_flight, seq)
            self._add_chunk(plan, seq, n)
            budget -= n
        return self._ordered(plan)

    @staticmethod
    def _ordered(plan: StepPlan) -> StepPlan:
        # Tokens of one adapter must be contiguous for the LoRA kernels (one segment per adapter).
        plan.decodes.sort(key=lambda c: c.seq.lora_slot)
        plan.prefills.sort(key=lambda c: c.seq.lora_slot)
        return plan

    def _add_chunk(self, plan: StepPlan, seq: Sequence, n: int) -> None:
        (plan.decodes if n == 1 else plan.prefills).append(ScheduledChunk(seq, n))

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        if seq.lora_slot >= 0:
            self.lora_slots.release(seq.lora_slot)
            seq.lora_slot = -1

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        # Back to the front (oldest first) so it resumes before newer arrivals.
        self.waiting.appendleft(seq)
        plan.preempted.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
