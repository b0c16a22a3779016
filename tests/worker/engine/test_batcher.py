"""The step planner's policy on fake sequences: no model needed."""

from worker.engine.batcher import Batcher
from worker.engine.block_manager import BlockManager
from worker.engine.sampling_params import SamplingParams
from worker.engine.sequence import Sequence, SequenceStatus


def make(n_prompt: int, arrival: int) -> Sequence:
    return Sequence(f"r{arrival}", list(range(1, n_prompt + 1)), SamplingParams(max_tokens=100), arrival)


def finish_step(plan):
    """What the engine does after a step: mark computed, append a token to sampling chunks."""
    for c in plan.chunks:
        samples = c.samples
        c.seq.num_computed_tokens += c.num_tokens
        if samples:
            c.seq.output_token_ids.append(7)


def test_decodes_and_prefill_chunks_share_one_step_under_the_budget():
    b = Batcher(BlockManager(64, 16), max_num_seqs=8, max_num_batched_tokens=100)
    first = make(30, 0)
    b.add(first)
    plan = b.plan()
    assert [(c.seq.request_id, c.num_tokens) for c in plan.prefills] == [("r0", 30)]
    finish_step(plan)
    b.add(make(200, 1))  # longer than the budget: chunked
    plan = b.plan()
    assert [c.num_tokens for c in plan.decodes] == [1]
    assert [c.num_tokens for c in plan.prefills] == [99]
    assert plan.num_tokens == 100
    assert not plan.prefills[0].samples  # a partial prompt picks no token
    finish_step(plan)
    plan = b.plan()
    assert [c.num_tokens for c in plan.prefills] == [99]
    finish_step(plan)
    plan = b.plan()
    assert [c.num_tokens for c in plan.decodes] == [1]
    assert [c.num_tokens for c in plan.prefills] == [2] and plan.prefills[0].samples


def test_max_num_seqs_limits_admission():
    b = Batcher(BlockManager(64, 16), max_num_seqs=2, max_num_batched_tokens=1000)
    for i in range(3):
        b.add(make(10, i))
    plan = b.plan()
    assert len(plan.prefills) == 2 and len(b.waiting) == 1


def test_newest_sequence_is_preempted_when_blocks_run_out_and_resumes_first():
    bm = BlockManager(4, 16)  # 64 slots
    b = Batcher(bm, max_num_seqs=4, max_num_batched_tokens=1000)
    old, new = make(32, 0), make(31, 1)
    b.add(old)
    b.add(new)
    finish_step(b.plan())  # old: 33 tokens (3 blocks? no: 2 blocks + token), new: 32
    # old needs a 3rd block for its next token; new holds 2: someone must go.
    plan = b.plan()
    assert plan.preempted == [new]
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0 and new.block_table == []
    assert b.waiting[0] is new
    assert [c.seq for c in plan.decodes] == [old]
    assert bm.num_free + sum(len(s.block_table) for s in b.running) == 4


def test_remove_frees_blocks():
    bm = BlockManager(8, 16)
    b = Batcher(bm, max_num_seqs=4, max_num_batched_tokens=1000)
    s = make(40, 0)
    b.add(s)
    b.plan()
    assert bm.num_free == 5
    b.remove(s)
    assert bm.num_free == 8 and not b.has_work()
