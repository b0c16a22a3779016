"""Owns the paged KV cache's blocks: a free list, reference counts (shared blocks are freed last) and,
for prefix caching, an index of full blocks by content key with an LRU of the unreferenced ones.

A block is in exactly one of three states:
- referenced (ref count > 0): in some sequence's block table;
- cached: unreferenced but keyed, its KV still valid; in `cached` (least recently used first), handed
  back on a hit or, when the free list is empty, evicted (its key dropped) and reused;
- free: unreferenced and holding nothing reusable.
Keys and tags are opaque here (hotswap/prefix_keys.py makes keys; the tag is the weights identity).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.cached: OrderedDict[int, None] = OrderedDict()  # unreferenced keyed blocks, LRU first
        self._index: dict[bytes, int] = {}  # key -> block
        self._keys: dict[int, bytes] = {}  # block -> key
        self._tags: dict[int, Hashable] = {}  # block -> weights identity it was computed under
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: free ones plus cached ones (evicted on demand)."""
        return len(self.free_blocks) + len(self.cached)

    @property
    def num_cached(self) -> int:
        return len(self.cached)

    def can_allocate(self, block_table: list[int], num_tokens: int, hits: Sequence[int] = ()) -> bool:
        """Whether a table can grow to hold `num_tokens` tokens, its first new blocks being `hits`."""
        extra = blocks_needed(num_tokens, self.block_size) - len(block_table) - len(hits)
        revived = sum(1 for b in hits if self.ref_counts[b] == 0)  # cached hits leave the free pool too
        return max(extra, 0) + revived <= self.num_free

    def allocate(self, block_table: list[int], num_tokens: int, hits: Sequence[int] = ()) -> None:
        """Grow `block_table` in place so it holds `num_tokens` tokens: first the cached `hits`
        (referenced once more), then fresh blocks (free ones first, else the least recently used cached)."""
        if not self.can_allocate(block_table, num_tokens, hits):
            extra = blocks_needed(num_tokens, self.block_size) - len(block_table)
            raise RuntimeError(f"out of KV blocks: need {extra}, {self.num_free} free")
        for block in hits:
            if self.ref_counts[block] == 0:
                del self.cached[block]
            self.ref_counts[block] += 1
            block_table.append(block)
        for _ in range(blocks_needed(num_tokens, self.block_size) - len(block_table)):
            block = self.free_blocks.popleft() if self.free_blocks else self._evict_lru()
            self.ref_counts[block] = 1
            block_table.append(block)

    def _evict_lru(self) -> int:
        block, _ = self.cached.popitem(last=False)
        self._unkey(block)
        self.num_evictions += 1
        return block

    def share(self, block_table: list[int]) -> list[int]:
        """A copy of the table whose blocks are now referenced once more (e.g. a forked sequence)."""
        for block in block_table:
            self.ref_counts[block] += 1
        return list(block_table)

    def free(self, block_table: list[int]) -> None:
        """Drop the table's references. Keyed blocks nobody references go to the cached LRU (the
        table's last block first, so a prefix outlives its tails), the others to the free list."""
        for block in reversed(block_table):
            if self.ref_counts[block] <= 0:
                raise RuntimeError(f"block {block} freed twice")
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if block in self._keys:
                    self.cached[block] = None
                else:
                    self.free_blocks.append(block)
        block_table.clear()

    def slot(self, block_table: list[int], position: int) -> int:
        return block_table[position // self.block_size] * self.block_size + position % self.block_size

    # -- prefix caching ---------------------------------------------------------------------------

    def lookup(self, key: bytes) -> int | None:
        """The block holding `key`'s KV (referenced or cached), or None."""
        return self._index.get(key)

    def register(self, block: int, key: bytes, tag: Hashable) -> bool:
        """Make a referenced block, now full and computed, findable by `key`. False (nothing done) if
        another block already holds that key (two sequences computed it at once) or this one has one."""
        if self.ref_counts[block] <= 0:
            raise RuntimeError(f"block {block} is not referenced: only a computed block can be registered")
        if key in self._index or block in self._keys:
            return False
        self._index[key], self._keys[block], self._tags[block] = block, key, tag
        return True

    def forget(self, pred: Callable[[Hashable], bool]) -> int:
        """Make every block whose tag matches unreachable (e.g. deleted weights): cached ones are
        freed now, referenced ones go to the free list when their last user frees them. Returns how many."""
        doomed = [b for b, tag in self._tags.items() if pred(tag)]
        for block in doomed:
            self._unkey(block)
            if self.ref_counts[block] == 0:
                del self.cached[block]
                self.free_blocks.append(block)
        return len(doomed)

    def demote(self, pred: Callable[[Hashable], bool]) -> int:
        """Move the cached blocks whose tag matches to the eviction end of the LRU, in their order
        (e.g. blocks of full weights no longer resident: still valid, but evicted first)."""
        matching = [b for b in self.cached if pred(self._tags[b])]
        for block in reversed(matching):
            self.cached.move_to_end(block, last=False)
        return len(matching)

    def _unkey(self, block: int) -> None:
        del self._index[self._keys.pop(block)]
        del self._tags[block]
