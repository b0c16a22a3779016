"""Content keys of full KV blocks, for prefix caching (pure and torch-free: any process can compute them).

A block's key chains the key of the block before it, the block's token ids and the identity of the
weights that produced its KV (the full weights, base or a fine-tune, and the LoRA adapter with its
version). Equal keys therefore mean equal KV: the same tokens after the same prefix under the same
weights. The same prompt under two adapters, or under an adapter's v1 and v2, never shares a key.
Keys are stable across processes and runs (no Python `hash()`), 16 bytes each.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

KEY_BYTES = 16
_ROOT = b"\x00"  # the first block's parent marker
_CHILD = b"\x01"


def weights_identity(full: str, adapter: str | None = None) -> str:
    """One string for the weights that make a block's KV: full weights plus the adapter, if any.
    Callers put a version in each part (e.g. "base", "ft:name#7", "lora:tenant/x@3#12")."""
    return full if adapter is None else f"{full}+{adapter}"


def block_key(parent: bytes | None, token_ids: Sequence[int], weights: str) -> bytes:
    """The key of a full block holding `token_ids`, after the block keyed `parent` (None: the first block)."""
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    h.update(_ROOT if parent is None else _CHILD + parent)
    w = weights.encode()
    h.update(struct.pack("<I", len(w)))  # length-prefixed, so identity and tokens cannot run together
    h.update(w)
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return h.digest()


def block_keys(token_ids: Sequence[int], block_size: int, weights: str) -> list[bytes]:
    """Keys of every full block of a token sequence, in order (a trailing partial block has none)."""
    keys: list[bytes] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        keys.append(block_key(keys[-1] if keys else None, token_ids[start:start + block_size], weights))
    return keys
