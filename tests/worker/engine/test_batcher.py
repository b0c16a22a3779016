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


class FakeSlots:
    """Two adapter slots, no tensors: the residency rules the batcher relies on."""

    def __init__(self, n: int = 2):
        self.users: dict[str, int] = {}
        self.slot: dict[str, int] = {}
        self.n = n

    def acquire(self, name):
        if name not in self.slot:
            free = [s for s in range(self.n) if s not in self.slot.values()]
            idle = [a for a, u in self.users.items() if u == 0]
            if not free and not idle:
                return None
            if not free:
                free = [self.slot.pop(idle[0])]
                del self.users[idle[0]]
            self.slot[name] = free[0]
        self.users[name] = self.users.get(name, 0) + 1
        return self.slot[name]

    def release(self, slot):
        name = next(a for a, s in self.slot.items() if s == slot)
        self.users[name] -= 1


def test_adapters_wait_for_a_free_slot_and_tokens_are_grouped_by_slot():
    slots = FakeSlots(2)
    b = Batcher(BlockManager(64, 16), max_num_seqs=8, max_num_batched_tokens=1000, lora_slots=slots)
    seqs = [make(5, i) for i in range(5)]
    for s, name in zip(seqs, ["a", "b", "c", None, "a"]):
        s.adapter = name
        b.add(s)
    plan = b.plan()
    admitted = {c.seq.request_id for c in plan.chunks}
    assert admitted == {"r0", "r1", "r3", "r4"}  # "c" has no free slot: it waits, others go on
    assert [c.seq.lora_slot for c in plan.prefills] == sorted(c.seq.lora_slot for c in plan.prefills)
    b.remove(seqs[1])  # "b" finishes: its slot can now be reused by "c"
    plan = b.plan()
    assert seqs[2] in [c.seq for c in plan.prefills] and seqs[2].lora_slot == 1


def test_other_finetune_waits_for_a_drain_then_asks_for_a_swap():
    b = Batcher(BlockManager(64, 16), max_num_seqs=8, max_num_batched_tokens=1000)
    base1, ft, base2 = make(5, 0), make(5, 1), make(5, 2)
    ft.finetune = "ft"
    for s in (base1, ft, base2):
        b.add(s)
    plan = b.plan()
    assert [c.seq for c in plan.chunks] == [base1, base2]  # same weights batch together
    finish_step(plan)
    assert not b.needs_swap()  # base sequences still run
    b.add(make(5, 3))  # a newer base request must not overtake the waiting fine-tune forever
    plan = b.plan()
    assert all(c.seq.finetune is None for c in plan.chunks) and len(plan.chunks) == 2
    b.remove(base1)
    b.remove(base2)
    assert b.needs_swap() and b.waiting[0] is ft
