"""Which CPU matmul path runs a weight of one shape at each decode row count: a pure choice from
measured timings (cpu_tuning.py measures them).

A path is "plain" (F.linear), "packed" (MKL's packed-weight GEMM, fp32 only) or "onednn" (oneDNN's
GEMM on its reordered weight, fp32 and bf16), each run either
at the batch's own row count or with the input zero-padded up to a larger measured row count
that is cheaper (some CPUs' GEMMs cost more at 13 rows than at 16). Row counts are measured at
ROW_BUCKETS; a row count between two buckets takes the next bucket's choice (padded to that
choice's row count when it pads, else run at its own). Rows above the last bucket run plain
(prefill chunks).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

PATHS = ("plain", "packed", "onednn")
DEFAULT = "plain"
# Decode row counts measured: every one up to 16 (where GEMM kernels differ most by row count),
# then coarser.
ROW_BUCKETS = (*range(1, 17), 24, 32, 48, 64)
# A path other than plain-at-own-rows must be this much faster to be chosen (timing noise).
MARGIN = 0.05
# The fixed rule, used when tuning is off (tuned on one AVX-512 machine): packed for 4..16 rows.
MIN_PACKED_ROWS = 4  # below this the plain GEMM was as fast (MKL's tiny-M kernel)
MAX_PACKED_ROWS = 16  # above this the packed path measured no faster in the engine

Timings = Mapping[str, Mapping[int, float]]  # path -> row count -> seconds (median), one weight shape


@dataclass(frozen=True)
class Choice:
    path: str  # "plain" | "packed" | "onednn"
    pad_to: int | None = None  # run with the input padded to this many rows; None: at its own

    def __str__(self) -> str:
        return self.path if self.pad_to is None else f"{self.path}@{self.pad_to}"


def buckets_for(max_rows: int) -> tuple[int, ...]:
    """The measured row counts for decode batches of up to max_rows rows."""
    upto = next((b for b in ROW_BUCKETS if b >= max_rows), ROW_BUCKETS[-1])
    return tuple(b for b in ROW_BUCKETS if b <= upto)


def choose(timings: Timings, margin: float = MARGIN) -> dict[int, Choice]:
    """Per measured row count, the fastest way to run it: a path at this row count or padded up to a
    larger measured one. Plain at its own row count wins unless another is `margin` faster."""
    buckets = sorted(timings[DEFAULT])
    plan = {}
    for b in buckets:
        best, best_cost = Choice(DEFAULT), timings[DEFAULT][b] * (1 - margin)
        for path in PATHS:
            for c in buckets:
                cost = timings.get(path, {}).get(c)
                if c < b or cost is None or (path == DEFAULT and c == b):
                    continue
                if cost < best_cost:
                    best, best_cost = Choice(path, None if c == b else c), cost
        plan[b] = best
    return plan


def fixed_plan(buckets: tuple[int, ...], packed: bool = True) -> dict[int, Choice]:
    """Today's rule as a plan (to describe it): packed for 4..16 rows where packing applies."""
    return {b: Choice("packed" if packed and MIN_PACKED_ROWS <= b <= MAX_PACKED_ROWS else DEFAULT) for b in buckets}


def row_table(plan: Mapping[int, Choice]) -> list[Choice | None]:
    """The plan as a list indexed by row count (0 .. last bucket): what a linear call looks up.
    Index 0 is None (nothing to run); a row count between buckets gets the next bucket's choice."""
    buckets = sorted(plan)
    table: list[Choice | None] = [None]
    for rows in range(1, buckets[-1] + 1):
        table.append(plan[next(b for b in buckets if b >= rows)])
    return table


def describe(table: list[Choice | None], max_rows: int | None = None) -> dict[str, str]:
    """Row ranges -> choice, e.g. {"1-3": "plain", "4-12": "packed", "13-15": "plain@16"}."""
    last = len(table) - 1 if max_rows is None else min(max_rows, len(table) - 1)
    out: dict[str, str] = {}
    start = 1
    for rows in range(1, last + 1):
        if rows == last or table[rows + 1] != table[rows]:
            out[str(rows) if start == rows else f"{start}-{rows}"] = str(table[rows])
            start = rows + 1
    if max_rows is None or max_rows > len(table) - 1:
        out[f"{len(table)}+"] = DEFAULT
    return out

