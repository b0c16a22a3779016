"""Paged attention for packed tokens: decode sequences first (one token each), then prefill chunks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.kernels.attention_decode import paged_decode_attention
from worker.kernels.attention_prefill import paged_prefill_attention
from worker.kernels.kv_store import store_kv


@dataclass
class AttentionMetadata:
    """Where every token of one step reads and writes KV. Built once per step, shared by all layers."""

    slot_mapping: torch.Tensor  # [num_tokens] int64, flat cache slot of each new token
    num_decode_tokens: int  # the first num_decode_tokens tokens are decodes, one per sequence
    decode_block_tables: torch.Tensor | None  # [num_decode, max_blocks] int32
    decode_context_lens: torch.Tensor | None  # [num_decode] int32, including the new token
    prefill_block_tables: torch.Tensor | None  # [num_prefill, max_blocks] int32
    prefill_cu_seqlens: torch.Tensor | None  # [num_prefill + 1] int32 query offsets (relative to decodes' end)
    prefill_context_lens: torch.Tensor | None  # [num_prefill] int32, including the new tokens


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    nd = meta.num_decode_tokens
    if nd == q.shape[0]:
        return paged_decode_attention(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale)
    prefill = paged_prefill_attention(
        q[nd:], k_cache, v_cache, meta.prefill_block_tables, meta.prefill_cu_seqlens, meta.prefill_context_lens, scale
    )
    if nd == 0:
        return prefill
    decode = paged_decode_attention(
        q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale
    )
    return torch.cat((decode, prefill), dim=0)
