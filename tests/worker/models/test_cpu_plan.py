"""The CPU path chooser is pure: timings in, plan out. Fed an Intel-like and a Zen-like table, it
picks differently, as the machines need."""

import pytest

from worker.models.cpu_plan import (
    MAX_PACKED_ROWS,
    MIN_PACKED_ROWS,
    ROW_BUCKETS,
    Choice,
    buckets_for,
    choose,
    describe,
    fixed_plan,
    row_table,
)

BUCKETS = buckets_for(64)


def intel_like() -> dict[str, dict[int, float]]:
    """The machine the fixed rule was tuned on: MKL's plain sgemm is poor at 4..16 rows (4 rows cost
    1.5x 3 rows) and the packed GEMM runs those 1.3-1.6x faster; elsewhere they are even."""
    plain = {r: (0.1 + 0.02 * r) * (1.5 if 4 <= r <= 16 else 1.0) for r in BUCKETS}
    packed = {r: plain[r] / 1.45 if 4 <= r <= 16 else plain[r] * 1.02 for r in BUCKETS}
    return {"plain": plain, "packed": packed}


def zen_like() -> dict[str, dict[int, float]]:
    """Issue #18's Zen 4 (3072x576, ms): packed gains nothing, and 13-15 rows cost more than 16."""
    plain = {r: 0.07 + 0.07 * r for r in BUCKETS if r <= 12}
    plain.update({13: 1.207, 14: 1.19, 15: 1.2, 16: 0.905, 24: 1.3, 32: 1.7, 48: 2.4, 64: 3.132})
    packed = {r: t * 1.1 for r, t in plain.items()}
    packed[13] = 1.076  # faster than plain at 13, but plain padded to 16 is faster still
    return {"plain": plain, "packed": packed}


def test_intel_like_timings_give_the_fixed_rule():
    plan = choose(intel_like())
    assert plan == fixed_plan(BUCKETS)
    assert [r for r, c in plan.items() if c == Choice("packed")] == list(range(MIN_PACKED_ROWS, MAX_PACKED_ROWS + 1))


def test_zen_like_timings_stay_plain_and_pad_13_to_16():
    plan = choose(zen_like())
    assert all(c.path == "plain" for c in plan.values())
    assert plan[13] == plan[14] == plan[15] == Choice("plain", 16)
    assert plan[12] == plan[16] == Choice("plain")  # 12 rows: 16 is cheaper, but by less than the margin
    assert plan != choose(intel_like())


def test_a_path_must_beat_plain_by_the_margin():
    timings = {"plain": {1: 1.0, 2: 2.0}, "packed": {1: 0.97, 2: 1.8}}
    assert choose(timings, margin=0.05) == {1: Choice("plain"), 2: Choice("packed")}
    assert choose(timings, margin=0.0) == {1: Choice("packed"), 2: Choice("packed")}


def test_padding_can_go_to_any_larger_bucket_and_path():
    timings = {"plain": {1: 1.0, 2: 5.0, 3: 5.0, 4: 3.0}, "packed": {1: 2.0, 2: 9.0, 3: 2.5, 4: 4.0}}
    assert choose(timings) == {1: Choice("plain"), 2: Choice("packed", 3), 3: Choice("packed"), 4: Choice("plain")}


def test_plain_only_timings_work():
    assert choose({"plain": {1: 1.0, 2: 3.0, 4: 2.0}}) == {1: Choice("plain"), 2: Choice("plain", 4),
                                                           4: Choice("plain")}


@pytest.mark.parametrize("max_rows, last", [(1, 1), (16, 16), (17, 24), (20, 24), (64, 64), (500, 64)])
def test_buckets_cover_the_decode_rows(max_rows, last):
    buckets = buckets_for(max_rows)
    assert buckets[-1] == last and buckets == tuple(b for b in ROW_BUCKETS if b <= last)


def test_rows_between_buckets_take_the_next_buckets_choice():
    plan = {16: Choice("plain"), 24: Choice("packed", 32), 32: Choice("packed")}
    table = row_table({**{r: Choice("plain") for r in range(1, 16)}, **plan})
    assert len(table) == 33 and table[0] is None
    assert table[17] == table[23] == table[24] == Choice("packed", 32)  # 17..24 rows run padded to 32
    assert table[25] == table[32] == Choice("packed")  # at their own row count


def test_describe_groups_row_ranges():
    table = row_table(choose(zen_like()))
    assert describe(table, 16) == {"1-12": "plain", "13-15": "plain@16", "16": "plain"}
    assert describe(table)["65+"] == "plain"
    assert describe(row_table(fixed_plan(buckets_for(16))), 16) == {"1-3": "plain", "4-16": "packed"}
    assert describe(row_table(fixed_plan(buckets_for(16), packed=False)), 16) == {"1-16": "plain"}
