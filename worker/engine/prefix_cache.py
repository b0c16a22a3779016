"""Prefix caching for the step planner: which cached blocks a sequence starts with, and which of its
blocks become reusable once computed.

Keys (hotswap/prefix_keys.py) are computed lazily and once per sequence: `seq.block_hashes[i]` is the
key of the sequence's i-th full block under `seq.weights_id`; a lookup walks them until the first
miss, and `commit` keys the blocks a step has just filled. Only full blocks are keyed, so the
default path (nothing shared) costs one small hash per `block_size` tokens.
"""

from __future__ import annotations

from collections.abc import Callable

from hotswap.prefix_keys import block_key, weights_identity
from worker.engine.block_manager import BlockManager
from worker.engine.sequence import Sequence

# (full weights id, adapter id or None): the tag each cached block carries in the BlockManager.
WeightsId = tuple[str, "str | None"]


class PrefixCache:
    def __init__(self, blocks: BlockManager, weights_of: Callable[[Sequence], WeightsId]):
        self.blocks = blocks
        self.block_size = blocks.block_size
        self._weights_of = weights_of  # resolved at each admission: weights can change between them
        self._retired: set[str] = set()  # ids of deleted or replaced weights: never keyed again

    def lookup(self, seq: Sequence, in_flight: set[bytes] = frozenset()) -> list[int] | None:
        """Cached blocks holding the sequence's longest cached prefix (no references taken). The
        last token is never covered, so there are always logits to sample from. None: the next
        block is one of `in_flight` (being computed by another sequence), so better wait a step or
        two and hit it than compute it twice."""
        weights = self.bind(seq)
        hits: list[int] = []
        if self._is_retired(weights):
            return hits
        for i in range((seq.num_tokens - 1) // self.block_size):
            key = self._key(seq, i)
            block = self.blocks.lookup(key)
            if block is None:
                return None if key in in_flight else hits
            hits.append(block)
        return hits

    def bind(self, seq: Sequence) -> WeightsId:
        """Key the sequence under the weights it runs on now, without looking anything up: its
        blocks are still registered as they fill (a request that needs every prompt position's
        logits computes them all, but others may reuse its blocks)."""
        weights = self._weights_of(seq)
        if weights != seq.weights_id:
            seq.weights_id, seq.block_hashes = weights, []
        return weights

    def in_flight(self, seqs: list[Sequence]) -> set[bytes]:
        """Keys of the full prompt blocks these (running) sequences have yet to compute."""
        keys: set[bytes] = set()
        for seq in seqs:
            self.add_in_flight(keys, seq)
        return keys

    def add_in_flight(self, keys: set[bytes], seq: Sequence) -> None:
        if seq.weights_id is None or self._is_retired(seq.weights_id):
            return
        for i in range(seq.num_computed_tokens // self.block_size, len(seq.prompt_token_ids) // self.block_size):
            keys.add(self._key(seq, i))

    def commit(self, seq: Sequence, computed_before: int) -> None:
        """Key the blocks that became full between `computed_before` and `seq.num_computed_tokens`."""
        first, end = computed_before // self.block_size, seq.num_computed_tokens // self.block_size
        if first == end or seq.weights_id is None or self._is_retired(seq.weights_id):
            return
        for i in range(first, end):
            self.blocks.register(seq.block_table[i], self._key(seq, i), seq.weights_id)

    def retire(self, part: str) -> int:
        """Weights (a full-weights id or an adapter id) are gone: their blocks become unreachable now
        and are never keyed again. Returns how many blocks were dropped from the index."""
        self._retired.add(part)
        return self.blocks.forget(lambda tag: part in tag)

    def demote_except(self, full_id: str) -> int:
        """A full-weights swap to `full_id`: other weights' blocks stay valid but are evicted first."""
        return self.blocks.demote(lambda tag: tag[0] != full_id)

    def _is_retired(self, weights: WeightsId) -> bool:
        return bool(self._retired) and any(part in self._retired for part in weights)

    def _key(self, seq: Sequence, i: int) -> bytes:
        hashes = seq.block_hashes
        if len(hashes) <= i:
            identity = weights_identity(*seq.weights_id)
            size = self.block_size
            while len(hashes) <= i:
                j = len(hashes)
                tokens = seq.token_ids(j * size, (j + 1) * size)
                hashes.append(block_key(hashes[-1] if hashes else None, tokens, identity))
        return hashes[i]
