"""The CPU multi-LoRA path (runs of slots through torch.bmm) against the SGMV torch reference."""

import pytest
import torch

from worker.kernels.lora_expand import lora_expand_reference
from worker.kernels.lora_segments import build_segments
from worker.kernels.lora_shrink import lora_shrink_reference
from worker.lora.cpu_batched import RunPlan, expand_run, plan_runs, run_weights, shrink_run, to_run


def test_plan_merges_consecutive_slots_and_pads_to_the_longest():
    (run,) = plan_runs([0, 0, 1, 2, 2, 2])
    assert (run.first, run.rows) == (0, 3)
    assert run.tokens == [0, 1, 0, 2, 2, 2, 3, 4, 5]
    assert run.real == [True, True, False, True, False, False, True, True, True]


def test_plan_ignores_base_tokens_and_any_token_order():
    assert plan_runs([-1, -1]) == []
    (run,) = plan_runs([1, -1, 0, 1, 0])
    assert (run.first, run.rows, run.tokens) == (0, 2, [2, 4, 0, 3])


def test_plan_splits_at_slot_gaps():
    runs = plan_runs([0, 2, 3])
    assert [(r.first, r.tokens) for r in runs] == [(0, [0]), (2, [1, 2])]


def test_plan_splits_when_padding_would_double_a_long_segment():
    # A 100-token prefill next to a 1-token decode: padding the decode to 100 rows is refused...
    runs = plan_runs([0] * 100 + [1])
    assert [(r.first, r.rows) for r in runs] == [(0, 100), (1, 1)]
    # ...while a few pad rows in a decode step are taken to save a call.
    assert [(r.first, r.rows) for r in plan_runs([0, 1, 1, 1, 2])] == [(0, 3)]


def test_to_run_finds_spans_of_x():
    plan = RunPlan(first=0, rows=2, tokens=[3, 4, 5, 5], real=[True, True, True, False])
    run = to_run(plan, [0.5, 2.0], ranks=[8, 16])
    assert run.span == slice(3, 6) and run.real_rows.tolist() == [0, 1, 2] and run.rank == 16
    assert run.row_scale.flatten().tolist() == [0.5, 0.5, 2.0, 0.0]
    scattered = to_run(RunPlan(first=1, rows=1, tokens=[4, 1], real=[True, True]), [0.0, 1.0, 3.0], [32, 8, 8])
    assert scattered.span is None and scattered.real_rows is None and scattered.rank == 8


# token slot layouts: decode-like (sorted, 1-3 per slot), with base tokens, unsorted, prefill + decode
LAYOUTS = [
    [0, 0, 1, 2, 2, 2, 3],
    [-1, 0, 1, 1, -1, 3, 3, 2],
    [2, 0, -1, 1, 0, 2, 3, 1],
    [1] * 40 + [0, 2, 2, 3] + [-1] * 3 + [3] * 17,
    [3, 1],
]


def batched_and_reference(layout, ranks, dtype=torch.float32):
    """(batched CPU path, SGMV reference, base) outputs for one layout: x, weights and base in dtype."""
    g = torch.Generator().manual_seed(len(layout))
    max_loras, rank, in_dim, outs = 4, 16, 48, (40, 24)  # two sub-projections, like k/v
    num_tokens = len(layout)
    x = torch.randn(num_tokens, in_dim, generator=g)
    lora_a = torch.randn(max_loras, len(outs), rank, in_dim, generator=g)
    lora_bt = [torch.randn(max_loras, rank, o, generator=g) for o in outs]  # B^T [L, R, out]
    for slot, r in enumerate(ranks):  # slot rows beyond the adapter's rank are zero, as LoraSlots keeps them
        lora_a[slot, :, r:] = 0
        for bt in lora_bt:
            bt[slot, r:] = 0
    lora_a = lora_a.flatten(1, 2).to(dtype)  # [L, n_sub * R, in]
    lora_bt = [bt.to(dtype) for bt in lora_bt]
    x = x.to(dtype)
    scalings = torch.tensor([0.5, 2.0, 1.0, 0.25])
    base = torch.randn(num_tokens, sum(outs), generator=g).to(dtype)

    indptr, seg_slots = build_segments(layout)
    want = base.clone()
    y_ref = lora_shrink_reference(x, lora_a, indptr, seg_slots)
    offset = 0
    for k, bt in enumerate(lora_bt):
        lora_expand_reference(y_ref[:, k * rank:(k + 1) * rank], bt.transpose(1, 2), scalings, indptr, seg_slots,
                              want, offset)
        offset += outs[k]

    got = base.clone()
    for run in (to_run(p, scalings.tolist(), ranks) for p in plan_runs(layout)):
        w = run_weights(lora_a, lora_bt, run.first, run.num_slots, run.rank)
        assert w.rank == max(ranks[run.first:run.first + run.num_slots]) and w.fused == (w.rank == rank)
        offset = 0
        for k, (y, b_t) in enumerate(zip(shrink_run(x, w, run), w.b_t)):
            expand_run(y, b_t, run, got[:, offset:offset + outs[k]])
            offset += outs[k]
    return got, want, base


@pytest.mark.parametrize("ranks", [[16, 16, 16, 16], [8, 16, 4, 8], [4, 4, 8, 8]])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_runs_match_the_segment_reference(layout, ranks):
    got, want, base = batched_and_reference(layout, ranks)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    base_rows = [t for t, s in enumerate(layout) if s < 0]
    assert torch.equal(got[base_rows], base[base_rows])  # base tokens untouched, bit for bit


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bf16_runs_match_the_fp32_accumulating_reference(layout):
    """bf16 on CPU takes the batched path too: its matmuls round y to bf16 (as PEFT in bf16 does) where
    the reference accumulates in fp32; the difference stays at bf16 rounding (relative error < 1%)."""
    got, want, base = batched_and_reference(layout, [8, 16, 4, 8], torch.bfloat16)
    assert got.dtype == torch.bfloat16
    err = ((got.float() - want.float()).norm() / (want.float() - base.float()).norm()).item()
    assert err < 1e-2, err
    base_rows = [t for t, s in enumerate(layout) if s < 0]
    assert torch.equal(got[base_rows], base[base_rows])
