"""Paged prefill attention: packed variable-length queries against the paged K/V cache.

Keys/values are read from the cache (already stored, including the new tokens), so a
chunk of a long prompt, or a recompute after preemption, sees its cached prefix. Query row
i of sequence s sits at position context_lens[s] - q_len_s + i and attends causally.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.kernels._dispatch import cdiv, check_attention, jit, next_pow2, tl, use_triton
from worker.kernels._online_softmax import LOG2E, attend_tile


def _check(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens):
    block_size, num_kv_heads, group = check_attention(q, k_cache, v_cache)
    if context_lens.dim() != 1:
        raise ValueError(f"context_lens must be [num_seqs], got {tuple(context_lens.shape)}")
    num_seqs = context_lens.shape[0]
    if cu_seqlens_q.shape != (num_seqs + 1,):
        raise ValueError(f"cu_seqlens_q must be [{num_seqs + 1}], got {tuple(cu_seqlens_q.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must be [{num_seqs}, max_blocks], got {tuple(block_tables.shape)}")
    return block_size, num_kv_heads, group


def paged_prefill_attention_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Torch version (also the CPU fast path): per sequence, gather its K/V and call SDPA in fp32."""
    block_size, num_kv_heads, group = _check(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens)
    cu = cu_seqlens_q.tolist()
    ctx_lens = context_lens.tolist()
    if cu[0] != 0 or cu[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens_q must run from 0 to num_tokens ({q.shape[0]}), got {cu[0]}..{cu[-1]}")
    out = torch.empty_like(q)  # [num_tokens, num_heads, head_dim]
    gqa = group > 1
    for s, ctx in enumerate(ctx_lens):
        start, end = cu[s], cu[s + 1]
        q_len = end - start
        if q_len == 0:
            continue
        if ctx < q_len:
            raise ValueError(f"sequence {s}: context_len {ctx} < its {q_len} query tokens")
        num_pages = cdiv(ctx, block_size)
        if num_pages > block_tables.shape[1]:
            raise ValueError(f"block_tables has {block_tables.shape[1]} columns, sequence {s} needs {num_pages}")
        pages = block_tables[s, :num_pages].to(device=q.device, dtype=torch.long)
        k = k_cache.index_select(0, pages).flatten(0, 1)[:ctx]  # [ctx, KVH, D]
        v = v_cache.index_select(0, pages).flatten(0, 1)[:ctx]  # [ctx, KVH, D]
        # 4-D [1, heads, len, D]: CPU SDPA runs its fused flash kernel only on 4-D inputs.
        qs = q[start:end].float().transpose(0, 1)[None]  # [1, H, q_len, D]
        ks, vs = k.float().transpose(0, 1)[None], v.float().transpose(0, 1)[None]  # [1, KVH, ctx, D]
        if q_len == ctx:  # no prefix: plain causal, no mask materialized
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=q_len > 1, scale=scale, enable_gqa=gqa)
        elif q_len == 1:  # the last position sees everything
            o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale, enable_gqa=gqa)
        else:  # causal, shifted by the cached prefix length
            mask = torch.ones(q_len, ctx, dtype=torch.bool, device=q.device).tril(ctx - q_len)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=gqa)
        o = o[0]  # [H, q_len, D]
        out[start:end] = o.transpose(0, 1).to(q.dtype)
    return out


@jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, cu_seqlens_ptr, context_lens_ptr,
    scale_log2, num_seqs, head_dim,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_bts, stride_btb,
    stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, IEEE: tl.constexpr,
):
    # Grid axis 0 enumerates query tiles of all sequences without a host sync: sequence s
    # owns tiles [cu[s] // BLOCK_M + s, ...) (at most one spare tile per sequence), so the
    # owner of a tile is the last s with cu[s] // BLOCK_M + s <= tile (binary search).
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kvh = head // GROUP
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_seqlens_ptr + mid) // BLOCK_M + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1

    q_start = tl.load(cu_seqlens_ptr + seq)
    q_len = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    q_tile = tile - (q_start // BLOCK_M + seq)
    if q_tile * BLOCK_M >= q_len:  # spare tile
        return
    ctx = tl.load(context_lens_ptr + seq)
    prefix = ctx - q_len

    rows = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] row within the sequence
    row_mask = rows < q_len
    q_pos = prefix + rows  # [BLOCK_M] cache position of each query
    tok = (q_start + rows).to(tl.int64)  # [BLOCK_M] packed token index
    d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = d < head_dim
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head * stride_qh + d[None, :] * stride_qd,
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, HEAD_DIM_PAD]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bts
    kv_end = tl.minimum(ctx, prefix + (q_tile + 1) * BLOCK_M)  # last query of this tile, + 1
    for tok0 in range(0, kv_end, BLOCK_N):
        acc, m_i, l_i = attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_row, tok0, kv_end, kvh, d,
                                    d_mask, q_pos, scale_log2, stride_kb, stride_kt, stride_kh, stride_kd,
                                    stride_vb, stride_vt, stride_vh, stride_vd, stride_btb,
                                    BLOCK_SIZE, BLOCK_N, True, IEEE)

    out = acc / l_i[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + head * stride_oh + d[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def paged_prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Causal attention for packed queries q [num_tokens, num_heads, head_dim] -> out, same shape/dtype.

    cu_seqlens_q [num_seqs + 1] int32 (sequence s owns rows cu[s]:cu[s+1]); context_lens [num_seqs]
    int32 counts the cached tokens including these; block_tables [num_seqs, max_blocks] int32.
    """
    if not use_triton(q):
        return paged_prefill_attention_reference(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale)
    block_size, num_kv_heads, group = _check(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens)
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = context_lens.shape[0]
    out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out

    head_dim_pad = max(16, next_pow2(head_dim))
    # 64x64 tiles for 16-bit heads up to 128; halve when tiles would take twice the
    # registers/shared memory (fp32, or wider heads).
    block = 64 if q.element_size() <= 2 and head_dim_pad <= 128 else 32
    grid = (cdiv(num_tokens, block) + num_seqs, num_heads)  # upper bound on query tiles; spares exit
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, cu_seqlens_q, context_lens,
        scale * LOG2E, num_seqs, head_dim,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), *out.stride(),
        GROUP=group, BLOCK_SIZE=block_size, BLOCK_M=block, BLOCK_N=block, HEAD_DIM_PAD=head_dim_pad,
        IEEE=q.dtype == torch.float32,
        num_warps=4, num_stages=2,
    )
    return out
