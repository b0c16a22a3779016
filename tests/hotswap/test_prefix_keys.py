"""The block key function: pure, stable, chained, and separated by weights identity."""

from __future__ import annotations

import pytest

from hotswap.prefix_keys import KEY_BYTES, block_key, block_keys, weights_identity


def test_keys_are_stable_bytes_across_processes():
    key = block_key(None, [1, 2, 3], "base")
    assert isinstance(key, bytes) and len(key) == KEY_BYTES
    assert key == block_key(None, (1, 2, 3), "base")
    # A golden value: no per-process salt (Python's hash() would differ between runs), and a change of
    # the key format shows here (other processes, e.g. the API, compute the same keys).
    assert key.hex() == "b5c934c40b0e6b01fa1ee023bbaae916"


@pytest.mark.parametrize("other", [
    (None, [1, 2, 4], "base"),  # another token
    (None, [1, 2, 3], "base+lora:a#1"),  # an adapter
    (None, [1, 2, 3], "ft:x#2"),  # other full weights
    (block_key(None, [9], "base"), [1, 2, 3], "base"),  # another parent
])
def test_any_input_changes_the_key(other):
    assert block_key(None, [1, 2, 3], "base") != block_key(*other)


def test_identity_and_tokens_cannot_run_together():
    assert block_key(None, [1], "a") != block_key(None, [], "a\x01\x00\x00\x00")


def test_versions_of_one_adapter_never_share():
    v1, v2 = weights_identity("base", "lora:t/x#1"), weights_identity("base", "lora:t/x#2")
    assert block_keys(list(range(64)), 16, v1)[0] != block_keys(list(range(64)), 16, v2)[0]
    assert weights_identity("base") == "base"


def test_block_keys_chain_full_blocks_only():
    tokens = list(range(100, 140))  # 2 full blocks of 16 + 8 tokens
    keys = block_keys(tokens, 16, "base")
    assert len(keys) == 2
    assert keys[0] == block_key(None, tokens[:16], "base")
    assert keys[1] == block_key(keys[0], tokens[16:32], "base")
    # A shared prefix that ends mid-block shares exactly the full blocks before it.
    other = tokens[:24] + [1] * 16
    assert block_keys(other, 16, "base")[0] == keys[0] and block_keys(other, 16, "base")[1] != keys[1]
    assert block_keys(tokens[:15], 16, "base") == []
