import pytest

from worker.engine.block_manager import BlockManager, blocks_needed


@pytest.mark.parametrize("tokens,size,expected", [(0, 16, 0), (1, 16, 1), (16, 16, 1), (17, 16, 2), (33, 16, 3)])
def test_blocks_needed(tokens, size, expected):
    assert blocks_needed(tokens, size) == expected


def test_allocate_grows_and_free_returns_everything():
    bm = BlockManager(num_blocks=4, block_size=16)
    table: list[int] = []
    assert bm.can_allocate(table, 40)
    bm.allocate(table, 40)
    assert len(table) == 3 and bm.num_free == 1
    bm.allocate(table, 48)  # still 3 blocks
    assert len(table) == 3
    assert not bm.can_allocate(table, 80)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(table, 80)
    bm.free(table)
    assert table == [] and bm.num_free == 4


def test_shared_blocks_are_freed_by_the_last_owner():
    bm = BlockManager(num_blocks=4, block_size=16)
    a: list[int] = []
    bm.allocate(a, 32)
    b = bm.share(a)
    bm.free(a)
    assert bm.num_free == 2  # b still holds them
    bm.free(b)
    assert bm.num_free == 4


def test_slot_maps_positions_through_the_table():
    bm = BlockManager(num_blocks=8, block_size=16)
    table = [5, 2]
    assert bm.slot(table, 0) == 80
    assert bm.slot(table, 15) == 95
    assert bm.slot(table, 16) == 32
    assert bm.slot(table, 31) == 47


# -- prefix caching: keyed blocks, the cached LRU ------------------------------------------------


def filled(bm: BlockManager, keys: list[bytes], tag="base") -> list[int]:
    """A table of len(keys) full blocks, each registered under its key (as after a computed prefill)."""
    table: list[int] = []
    bm.allocate(table, len(keys) * bm.block_size)
    for block, key in zip(table, keys):
        assert bm.register(block, key, (tag, None))
    return table


def test_freed_keyed_blocks_stay_cached_and_hit_after_free():
    bm = BlockManager(num_blocks=4, block_size=16)
    table = filled(bm, [b"k0", b"k1"])
    blocks = list(table)
    bm.free(table)
    assert bm.num_free == 4 and bm.num_cached == 2 and len(bm.free_blocks) == 2
    assert [bm.lookup(b"k0"), bm.lookup(b"k1")] == blocks
    again: list[int] = []
    assert bm.can_allocate(again, 40, hits=blocks)
    bm.allocate(again, 40, hits=blocks)  # 2 hits + 1 fresh block
    assert again[:2] == blocks and bm.ref_counts[blocks[0]] == 1
    assert bm.num_cached == 0 and bm.num_free == 1


def test_hits_on_referenced_blocks_are_shared_and_cost_nothing():
    bm = BlockManager(num_blocks=3, block_size=16)
    a = filled(bm, [b"k0", b"k1"])
    b: list[int] = []
    assert bm.can_allocate(b, 40, hits=a)  # only one fresh block needed, and one is free
    bm.allocate(b, 40, hits=a)
    assert bm.ref_counts[a[0]] == 2 and bm.num_free == 0
    bm.free(a)
    assert bm.num_cached == 0  # still referenced by b
    bm.free(b)
    assert bm.num_cached == 2 and bm.num_free == 3


def test_cached_hits_count_against_the_free_pool():
    bm = BlockManager(num_blocks=3, block_size=16)
    t = filled(bm, [b"k0", b"k1"])
    hits = list(t)
    bm.free(t)
    other: list[int] = []
    bm.allocate(other, 16)  # takes the one never-keyed free block
    assert not bm.can_allocate([], 48, hits=hits)  # 2 revived + 1 fresh > 2 allocatable
    assert bm.can_allocate([], 32, hits=hits)


def test_lru_eviction_order_when_the_free_list_is_empty():
    bm = BlockManager(num_blocks=4, block_size=16)
    old = filled(bm, [b"a0", b"a1"])
    new = filled(bm, [b"b0", b"b1"])
    a0, a1, b0, b1 = *old, *new
    bm.free(old)  # freed first: least recently used; a sequence's tail goes before its head
    bm.free(new)
    assert list(bm.cached) == [a1, a0, b1, b0]
    t: list[int] = []
    bm.allocate(t, 16)
    assert t == [a1] and bm.lookup(b"a1") is None and bm.lookup(b"a0") == a0 and bm.num_evictions == 1
    hit: list[int] = []
    bm.allocate(hit, 16, hits=[a0])  # a hit takes it out of the LRU...
    bm.free(hit)  # ...and freeing makes it the most recent
    assert list(bm.cached) == [b1, b0, a0]
    bm.allocate(t, 48)
    assert t == [a1, b1, b0] and bm.lookup(b"b0") is None and list(bm.cached) == [a0]


def test_register_refuses_duplicates_and_free_blocks():
    bm = BlockManager(num_blocks=4, block_size=16)
    a = filled(bm, [b"k0"])
    b: list[int] = []
    bm.allocate(b, 16)
    assert not bm.register(b[0], b"k0", ("base", None))  # computed twice at once: the first keeps the key
    assert not bm.register(a[0], b"other", ("base", None))  # a block has one key
    duplicate = b[0]
    bm.free(b)
    assert bm.num_cached == 0 and len(bm.free_blocks) == 3  # the unkeyed duplicate is plainly free
    with pytest.raises(RuntimeError, match="not referenced"):
        bm.register(duplicate, b"k9", ("base", None))


def test_no_double_free_of_a_cached_block():
    bm = BlockManager(num_blocks=2, block_size=16)
    t = filled(bm, [b"k0"])
    copy = list(t)
    bm.free(t)
    with pytest.raises(RuntimeError, match="freed twice"):
        bm.free(copy)
    assert bm.ref_counts == [0, 0] and bm.num_free == 2 and bm.num_cached == 1


def test_forget_makes_blocks_unreachable_now_or_when_freed():
    bm = BlockManager(num_blocks=4, block_size=16)
    gone = filled(bm, [b"x0"], tag="lora:x#1")
    busy = filled(bm, [b"x1"], tag="lora:x#1")
    kept = filled(bm, [b"k0"])
    bm.free(gone)
    bm.free(kept)
    assert bm.forget(lambda tag: "lora:x#1" in tag) == 2
    assert bm.lookup(b"x0") is None and bm.lookup(b"x1") is None and bm.lookup(b"k0") is not None
    assert bm.num_cached == 1 and bm.num_free == 3
    bm.free(busy)  # no key any more: straight to the free list
    assert bm.num_cached == 1 and len(bm.free_blocks) == 3


def test_demote_moves_other_weights_to_the_eviction_end():
    bm = BlockManager(num_blocks=4, block_size=16)
    base = filled(bm, [b"b0", b"b1"])
    ft = filled(bm, [b"f0", b"f1"], tag="ft:x#1")
    bm.free(list(ft))
    bm.free(list(base))
    assert list(bm.cached) == [ft[1], ft[0], base[1], base[0]]
    assert bm.demote(lambda tag: tag[0] != "ft:x#1") == 2  # swapped to x: the base's blocks go first
    assert list(bm.cached) == [base[1], base[0], ft[1], ft[0]]
    assert bm.lookup(b"b0") == base[0]  # still valid until evicted
