"""Prefix caching in the step planner, on fake sequences: no model needed."""

from __future__ import annotations

from tests.worker.engine.test_batcher import FakeSlots
from worker.engine.batcher import Batcher
from worker.engine.block_manager import BlockManager
from worker.engine.prefix_cache import PrefixCache
from worker.engine.sampling_params import SamplingParams
from worker.engine.sequence import Sequence


def weights_of(seq: Sequence):
    return "base", None if seq.adapter is None else f"lora:{seq.adapter}#1"


def setup(num_blocks=64, budget=1000, max_num_seqs=8):
    bm = BlockManager(num_blocks, 16)
    cache = PrefixCache(bm, weights_of)
    return bm, cache, Batcher(bm, max_num_seqs, budget, lora_slots=FakeSlots(2), prefix_cache=cache)


def make(tokens: list[int], arrival: int, adapter: str | None = None) -> Sequence:
    return Sequence(f"r{arrival}", list(tokens), SamplingParams(max_tokens=100), arrival, adapter=adapter)


def finish_step(plan, cache: PrefixCache):
    """What the engine does after a step: mark computed, key full blocks, append a token when sampling."""
    for c in plan.chunks:
        samples, before = c.samples, c.seq.num_computed_tokens
        c.seq.num_computed_tokens += c.num_tokens
        cache.commit(c.seq, before)
        if samples:
            c.seq.output_token_ids.append(7)


PREFIX = list(range(100, 140))  # 2.5 blocks


def test_a_new_sequence_starts_after_its_longest_cached_prefix():
    bm, cache, b = setup()
    first = make(PREFIX + [1, 2, 3], 0)
    b.add(first)
    finish_step(b.plan(), cache)
    second = make(PREFIX + [4, 5], 1)  # shares 40 tokens: 2 full blocks, the third differs mid-block
    b.add(second)
    plan = b.plan()
    chunk = next(c for c in plan.prefills if c.seq is second)
    assert second.num_cached_tokens == 32 and chunk.num_tokens == 42 - 32  # the budget counts computed tokens only
    assert second.block_table[:2] == first.block_table[:2] and second.block_table[2] != first.block_table[2]
    assert bm.ref_counts[first.block_table[0]] == 2
    assert first.num_cached_tokens == 0


def test_the_last_token_is_always_computed():
    bm, cache, b = setup()
    aligned = list(range(200, 232))  # exactly 2 blocks
    b.add(make(aligned, 0))
    finish_step(b.plan(), cache)
    again = make(aligned, 1)
    b.add(again)
    plan = b.plan()
    assert again.num_cached_tokens == 16  # the second block holds the last token: recomputed in a fresh block
    assert [c.num_tokens for c in plan.prefills] == [16] and plan.prefills[0].samples


def test_other_weights_never_hit():
    _, cache, b = setup()
    b.add(make(PREFIX, 0))
    finish_step(b.plan(), cache)
    lora = make(PREFIX, 1, adapter="x")
    b.add(lora)
    b.plan()
    assert lora.num_cached_tokens == 0


def test_blocks_of_finished_sequences_are_reused_and_tokens_of_outputs_are_keyed_too():
    bm, cache, b = setup()
    seq = make(PREFIX[:20], 0)
    b.add(seq)
    for _ in range(14):  # 20 prompt tokens + 13 outputs computed: 2 full blocks keyed
        finish_step(b.plan(), cache)
    assert len(seq.block_hashes) == 2
    tokens = seq.prompt_token_ids + seq.output_token_ids
    b.remove(seq)
    assert bm.num_cached == 2
    follow_up = make(tokens + [9], 1)  # e.g. the next turn of a chat
    b.add(follow_up)
    b.plan()
    assert follow_up.num_cached_tokens == 32


def test_a_preempted_sequence_resumes_from_its_own_cached_blocks():
    bm, cache, b = setup(num_blocks=4)
    old, new = make(list(range(10, 42)), 0), make(list(range(50, 81)), 1)
    b.add(old)
    b.add(new)
    finish_step(b.plan(), cache)  # old: 32 prompt + 1 output (needs a 3rd block next), new: 31 + 1
    plan = b.plan()
    assert plan.preempted == [new] and bm.num_cached == 1  # new's full first block stays cached
    finish_step(plan, cache)
    b.remove(old)  # frees room; old's blocks are cached too now
    plan = b.plan()
    chunk = next(c for c in plan.chunks if c.seq is new)
    assert new.num_computed_tokens == 16 and chunk.num_tokens == 16  # resumed after its own cached block
    assert new.num_cached_tokens == 0  # the request's figure is from its first admission
    assert new.num_preemptions == 1


def test_retired_weights_are_unreachable_and_never_keyed_again():
    bm, cache, b = setup()
    first = make(PREFIX, 0, adapter="x")
    b.add(first)
    finish_step(b.plan(), cache)
    assert cache.retire("lora:x#1") == 2
    queued = make(PREFIX, 1, adapter="x")  # already queued when the adapter was deleted: still runs
    b.add(queued)
    finish_step(b.plan(), cache)
    assert queued.num_cached_tokens == 0
    b.remove(first)
    b.remove(queued)
    assert bm.num_cached == 0 and bm.num_free == 64


def test_a_sequence_waits_for_a_prefix_another_is_computing_instead_of_computing_it_twice():
    _, cache, b = setup(budget=1000)
    first, twin, other = make(PREFIX + [1], 0), make(PREFIX + [2], 1), make(list(range(300, 340)), 2)
    for s in (first, twin, other):
        b.add(s)
    plan = b.plan()
    assert [c.seq for c in plan.prefills] == [first, other]  # the twin lets a newer, unrelated one go first
    finish_step(plan, cache)
    plan = b.plan()
    assert twin.num_cached_tokens == 32 and [c.num_tokens for c in plan.prefills] == [41 - 32]


def test_a_chunked_prefill_keeps_its_later_blocks_in_flight():
    _, cache, b = setup(budget=30)
    long, twin = make(PREFIX + [1], 0), make(PREFIX + [2], 1)
    b.add(long)
    b.add(twin)
    finish_step(b.plan(), cache)  # long: 30 of 41 tokens, 1 block keyed; its 2nd block is still coming
    plan = b.plan()  # long takes its last 11 tokens; 19 tokens of budget left, but the twin waits
    assert twin in b.waiting and [c.seq for c in plan.chunks] == [long] and twin.num_cached_tokens is None
    finish_step(plan, cache)
    b.plan()
    assert twin.num_cached_tokens == 32
