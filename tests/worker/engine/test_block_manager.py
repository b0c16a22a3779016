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
