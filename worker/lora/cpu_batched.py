"""The CPU path of a multi-LoRA step: one batched matmul per run of neighbouring slots.

The SGMV reference runs one matmul per segment. In a CPU decode step a segment is 1-3 tokens, so
each matmul is a tiny GEMV and its per-call cost, not the bytes of the weights, set the price:
~2,000 calls per step for 8 adapters on the demo model. Here the tokens of a run of neighbouring
slots are gathered into a zero-padded [n_slots, rows, in] block, and one torch.bmm per group
(shrink) and per sub-projection (expand) reads the run's stacked slot weights in place, only up
to the run's largest rank (the slots' rows beyond their adapter's rank are zero).

The plan of a step is built once in `plan_runs` (pure) and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A run may pad its slots up to the same row count while the padding rows stay within this
# share of its real rows (+ a few rows any decode step may waste): more, and a long prefill
# segment next to a short one would double its work.
_PAD_SHARE, _PAD_SLACK = 0.5, 16


@dataclass(frozen=True)
class RunPlan:
    """Pure plan of one run: slots first .. first + len(tokens) // rows - 1, each padded to `rows` rows."""

    first: int
    rows: int
    tokens: list[int]  # [n_slots * rows] token of each padded row (pad rows repeat a real token)
    real: list[bool]  # [n_slots * rows] False for pad rows


def plan_runs(token_slots: list[int]) -> list[RunPlan]:
    """Runs of consecutive slots for the tokens of a step (-1 = no LoRA; any token order)."""
    by_slot: dict[int, list[int]] = {}
    for t, s in enumerate(token_slots):
        if s >= 0:
            by_slot.setdefault(s, []).append(t)
    groups: list[list[int]] = []  # each: consecutive slots of one run
    for slot in sorted(by_slot):
        run = groups[-1] if groups else None
        if run and run[-1] + 1 == slot:
            counts = [len(by_slot[s]) for s in run] + [len(by_slot[slot])]
            real = sum(counts)
            if len(counts) * max(counts) - real <= _PAD_SHARE * real + _PAD_SLACK:
                run.append(slot)
                continue
        groups.append([slot])
    plans = []
    for run in groups:
        rows = max(len(by_slot[s]) for s in run)
        tokens, real = [], []
        for s in run:
            toks = by_slot[s]
            pad = rows - len(toks)
            tokens += toks + [toks[0]] * pad
            real += [True] * len(toks) + [False] * pad
        plans.append(RunPlan(run[0], rows, tokens, real))
    return plans


@dataclass
class Run:
    """A RunPlan as tensors for the functions below."""

    first: int
    num_slots: int
    rows: int
    rank: int  # largest adapter rank among the run's slots: rank rows read
    tokens: torch.Tensor  # [n * rows] int64, token of each padded row
    span: slice | None  # the real tokens, in padded-row order, are exactly x[span]
    real_rows: torch.Tensor | None  # [k] int64 padded rows holding real tokens; None: no pad rows
    row_scale: torch.Tensor  # [n, rows, 1] fp32: the slot's scaling, 0 on pad rows


def to_run(plan: RunPlan, scalings: list[float], ranks: list[int]) -> Run:
    """scalings, ranks: per slot."""
    n = len(plan.tokens) // plan.rows
    real_tokens = [t for t, real in zip(plan.tokens, plan.real) if real]
    lo = real_tokens[0]
    span = slice(lo, lo + len(real_tokens)) if real_tokens == list(range(lo, lo + len(real_tokens))) else None
    real_rows = None if all(plan.real) else torch.tensor([i for i, real in enumerate(plan.real) if real])
    scale = [scalings[plan.first + i // plan.rows] if real else 0.0 for i, real in enumerate(plan.real)]
    return Run(plan.first, n, plan.rows, max(ranks[plan.first: plan.first + n]),
               torch.tensor(plan.tokens, dtype=torch.int64), span, real_rows,
               torch.tensor(scale, dtype=torch.float32).view(n, plan.rows, 1))


@dataclass
class RunWeights:
    """Views of one layer's group weights for a run (no copies)."""

    a_t: list[torch.Tensor]  # one fused A^T [n, in, n_sub * R] at full rank, else per sub [n, in, rank]
    b_t: list[torch.Tensor]  # per sub B^T [n, rank, out_sub]
    rank: int
    fused: bool


def run_weights(lora_a: torch.Tensor, lora_bt: list[torch.Tensor], first: int, num_slots: int,
                rank: int) -> RunWeights:
    """lora_a: [max_loras, n_sub * R, in]; lora_bt: per sub [max_loras, R, out_sub] (one layer)."""
    a = lora_a[first: first + num_slots]
    n_sub, R = len(lora_bt), lora_bt[0].shape[1]
    b_t = [bt[first: first + num_slots, :rank] for bt in lora_bt]
    if rank == R:  # one shrink for the whole group
        return RunWeights([a.transpose(1, 2)], b_t, rank, True)
    per_sub = a.unflatten(1, (n_sub, R))[:, :, :rank]  # [n, n_sub, rank, in]
    return RunWeights([per_sub[:, k].transpose(1, 2) for k in range(n_sub)], b_t, rank, False)


def shrink_run(x: torch.Tensor, w: RunWeights, run: Run) -> list[torch.Tensor]:
    """Per sub-projection y [n, rows, rank] = scaling * (A[slot] @ x[t]) (0 on pad rows). x: [T, in]."""
    if run.span is not None and run.real_rows is None:
        xs = x[run.span]  # a view: no gather
    else:
        xs = x.index_select(0, run.tokens)
    xs = xs.view(run.num_slots, run.rows, -1)
    if w.fused:
        y = torch.bmm(xs, w.a_t[0]).mul_(run.row_scale)  # [n, rows, n_sub * R]
        return [y[:, :, k * w.rank:(k + 1) * w.rank] for k in range(len(w.b_t))]
    return [torch.bmm(xs, a_t).mul_(run.row_scale) for a_t in w.a_t]


def expand_run(y: torch.Tensor, b_t: torch.Tensor, run: Run, out: torch.Tensor) -> None:
    """out[t] += B[slot] @ y[t] for the run's tokens.

    y: [n, rows, rank] from shrink_run; b_t: B^T [n, rank, out_sub]; out: [T, out_sub], a column
    slice of the fused output, updated in place.
    """
    if run.span is not None and run.num_slots == 1:
        out[run.span].addmm_(y[0], b_t[0])
        return
    delta = torch.bmm(y, b_t).view(-1, b_t.shape[2])  # [n * rows, out_sub]
    if run.span is None:
        out.index_add_(0, run.tokens, delta)  # pad rows of y are 0: they add nothing
    elif run.real_rows is None:
        out[run.span] += delta
    else:
        out[run.span] += delta.index_select(0, run.real_rows)
