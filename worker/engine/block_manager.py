"""Owns the paged KV cache's blocks: a free list and reference counts (shared blocks are freed last)."""

from __future__ import annotations

from collections import deque


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

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def can_allocate(self, block_table: list[int], num_tokens: int) -> bool:
        """Whether a table can grow to hold `num_tokens` tokens."""
        return blocks_needed(num_tokens, self.block_size) - len(block_table) <= self.num_free

    def allocate(self, block_table: list[int], num_tokens: int) -> None:
        """Grow `block_table` in place so it holds `num_tokens` tokens."""
        extra = blocks_needed(num_tokens, self.block_size) - len(block_table)
        if extra > self.num_free:
            raise RuntimeError(f"out of KV blocks: need {extra}, {self.num_free} free")
        for _ in range(extra):
            block = self.free_blocks.popleft()
            self.ref_counts[block] = 1
            block_table.append(block)

    def share(self, block_table: list[int]) -> list[int]:
        """A copy of the table whose blocks are now referenced once more (e.g. a forked sequence)."""
        for block in block_table:
            self.ref_counts[block] += 1
        return list(block_table)

    def free(self, block_table: list[int]) -> None:
        for block in reversed(block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)
            elif self.ref_counts[block] < 0:
                raise RuntimeError(f"block {block} freed twice")
        block_table.clear()

    def slot(self, block_table: list[int], position: int) -> int:
        return block_table[position // self.block_size] * self.block_size + position % self.block_size
