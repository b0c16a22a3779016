"""Paged decode attention: one query token per sequence against its paged K/V cache.

Triton path is flash-decoding: each program owns one (sequence, kv head, split of the
context) and all query heads of that kv head's GQA group, runs an online softmax in fp32,
and (with several splits) a second kernel merges the splits by their log-sum-exp.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from worker.kernels._dispatch import cdiv, check_attention, jit, next_pow2, tl, use_triton
from worker.kernels._online_softmax import LOG2E, attend_tile

_MIN_TOKENS_PER_SPLIT = 256  # below this a split's fixed cost outweighs the extra parallelism
_MAX_SPLITS = 32


def _check(q, k_cache, v_cache, block_tables, context_lens):
    block_size, num_kv_heads, group = check_attention(q, k_cache, v_cache)
    num_seqs = q.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must be [{num_seqs}, max_blocks], got {tuple(block_tables.shape)}")
    if context_lens.shape != (num_seqs,):
        raise ValueError(f"context_lens must be [{num_seqs}], got {tuple(context_lens.shape)}")
    return block_size, num_kv_heads, group


def paged_decode_attention_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, num_splits: int | None = None,
) -> torch.Tensor:
    """Torch version (also the CPU path): the sequences in 1-4 groups of similar context length
    (`length_groups`), each group's K/V gathered up to its own longest context, one SDPA per group.

    num_splits is accepted for signature parity and ignored. A context_len of 0 gives zeros.
    """
    _check(q, k_cache, v_cache, block_tables, context_lens)
    if q.shape[0] == 0:
        return torch.empty_like(q)
    groups = length_groups(tuple(context_lens.tolist()))
    if len(groups) == 1:
        return _attend_padded(q, k_cache, v_cache, block_tables, context_lens, scale)
    out = torch.empty_like(q)
    for rows in groups:
        idx = torch.tensor(rows, device=q.device)  # [n] rows of this group
        out[idx] = _attend_padded(q[idx], k_cache, v_cache, block_tables[idx], context_lens[idx], scale)
    return out


# What one more group costs (an SDPA call and a gather per layer), in padded context rows: ~100 us
# on a Zen 4 core pair, where a row of 16 sequences at ~600 tokens costs ~2 us (gather + attention).
GROUP_COST_ROWS = 64
MAX_GROUPS = 4


@functools.lru_cache(maxsize=8)  # every layer of a step asks with the same lengths
def length_groups(context_lens: tuple[int, ...], group_cost: int = GROUP_COST_ROWS,
                  max_groups: int = MAX_GROUPS) -> tuple[tuple[int, ...], ...]:
    """Sequences (indices) split into 1..max_groups groups of similar context length, so the K/V
    gather pads each group to its own longest context rather than the batch's (in a batch of 16 whose
    contexts spread over 30-770 tokens, padding to the longest doubles the work). The candidates are
    the length-sorted order cut into k near-equal parts; the cheapest by sum(len(group) x its longest)
    + group_cost per group wins."""
    order = sorted(range(len(context_lens)), key=context_lens.__getitem__)
    best, best_cost = None, float("inf")
    for k in range(1, min(max_groups, len(order)) + 1):
        bounds = [len(order) * g // k for g in range(k + 1)]
        groups = tuple(tuple(order[a:b]) for a, b in zip(bounds, bounds[1:]))
        cost = sum(len(g) * context_lens[g[-1]] + group_cost for g in groups)
        if cost < best_cost:
            best, best_cost = groups, cost
    return best


def _attend_padded(q, k_cache, v_cache, block_tables, context_lens, scale) -> torch.Tensor:
    """Every sequence's K/V gathered up to the longest context of these sequences, then one SDPA."""
    block_size, num_kv_heads, group = check_attention(q, k_cache, v_cache)
    num_seqs, num_heads, head_dim = q.shape
    max_ctx = int(context_lens.max())
    num_pages = cdiv(max_ctx, block_size)
    if num_pages > block_tables.shape[1]:
        raise ValueError(f"block_tables has {block_tables.shape[1]} columns, context needs {num_pages}")
    if max_ctx == 0:
        return torch.zeros_like(q)

    # One row gather per K and V (index_select of whole [KVH, D] slots) into [S, T, KVH, D]; SDPA
    # reads the [S, KVH, T, D] transpose through its strides and fuses scores, mask and softmax,
    # so no transposed copy and no [S, H, T] score tensor is made (16 sequences of 200-420 tokens,
    # per step: 23 -> 10 ms besides the 14 ms gather, against two transposed copies + two matmuls).
    # Positions past a sequence's end read its own first token, which is always written (finite),
    # and are masked out of the softmax, so junk or NaN in unused slots never leaks in.
    ctx = context_lens.to(device=q.device, dtype=torch.long)
    pos = torch.arange(max_ctx, device=q.device)  # [T]
    pad = pos[None, :] >= ctx[:, None]  # [S, T]
    page = torch.where(pad, 0, pos[None, :] // block_size)  # [S, T]
    blocks = torch.gather(block_tables.to(device=q.device, dtype=torch.long), 1, page)  # [S, T]
    blocks = torch.where((ctx == 0)[:, None], 0, blocks)  # an empty context's table may hold anything
    slots = (blocks * block_size + torch.where(pad, 0, pos[None, :] % block_size)).flatten()  # [S*T]

    # SDPA runs in the cache's dtype when q has it too, else in fp32 (the CPU engine keeps an fp32
    # cache for a bf16 model: EngineConfig.kv_cache_dtype says why).
    dtype = q.dtype if q.dtype == k_cache.dtype else torch.float32

    def gather(cache: torch.Tensor) -> torch.Tensor:  # -> [S, KVH, T, D] (a strided view)
        rows = cache.view(-1, num_kv_heads * head_dim).index_select(0, slots)  # [S*T, KVH*D]
        return rows.to(dtype).view(num_seqs, max_ctx, num_kv_heads, head_dim).transpose(1, 2)

    # A kv head's GQA group of query heads rides as its "query rows", so each K/V row is read once.
    qh = q.to(dtype).reshape(num_seqs, num_kv_heads, group, head_dim)  # [S, KVH, G, D]
    visible = ~pad[:, None, None, :]  # [S, 1, 1, T]; True = attend
    out = F.scaled_dot_product_attention(qh, gather(k_cache), gather(v_cache), attn_mask=visible, scale=scale)
    if bool((ctx == 0).any()):
        out[ctx == 0] = 0.0  # empty contexts: nothing visible -> nan; defined as zeros
    return out.reshape(num_seqs, num_heads, head_dim).to(q.dtype)


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _auto_num_splits(max_ctx: int, num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Split only when the context is long AND (seq, kv head) programs alone underfill the GPU.

    Uses a shape-only bound on the context (no GPU sync), so it is CUDA-graph safe.
    """
    by_length = max_ctx // _MIN_TOKENS_PER_SPLIT
    if by_length <= 1:
        return 1
    target_programs = 2 * (_num_sms(_device_index(device)) if device.type == "cuda" else 128)
    by_occupancy = cdiv(target_programs, max(num_seqs * num_kv_heads, 1))
    splits = max(1, min(by_length, by_occupancy, _MAX_SPLITS))
    return 1 << (splits.bit_length() - 1)  # powers of two: fewer kernel variants to compile


@jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    scale_log2, head_dim,
    stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_bts, stride_btb,
    stride_os, stride_oh, stride_od,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    # Splits are whole cache blocks of this sequence's own context, so short sequences in a
    # ragged batch get short splits instead of empty ones.
    ctx = tl.load(context_lens_ptr + seq)
    pages_per_split = tl.cdiv(tl.cdiv(ctx, BLOCK_SIZE), NUM_SPLITS)
    start = split * pages_per_split * BLOCK_SIZE
    end = tl.minimum(start + pages_per_split * BLOCK_SIZE, ctx)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    heads = kvh * GROUP + g  # [GROUP_PAD] query heads of this kv head (padded for tl.dot)
    g_mask = g < GROUP
    d_mask = d < head_dim
    q_mask = g_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qs + heads[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=q_mask, other=0.0)  # [GROUP_PAD, HEAD_DIM_PAD]

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([GROUP_PAD], tl.float32)  # running sum of exp2
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bts
    for tok0 in range(start, end, BLOCK_N):
        acc, m_i, l_i = attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_row, tok0, end, kvh, d, d_mask,
                                    0, scale_log2, stride_kb, stride_kt, stride_kh, stride_kd,
                                    stride_vb, stride_vt, stride_vh, stride_vd, stride_btb,
                                    BLOCK_SIZE, BLOCK_N, False, IEEE)

    nonempty = l_i > 0.0  # empty splits (and empty contexts) have l_i == 0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        o_ptrs = out_ptr + seq.to(tl.int64) * stride_os + heads[:, None] * stride_oh + d[None, :] * stride_od
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        # Partials are contiguous fp32: [num_seqs, num_heads, NUM_SPLITS, HEAD_DIM_PAD] and [.., NUM_SPLITS].
        row = (seq.to(tl.int64) * (tl.num_programs(1) * GROUP) + heads) * NUM_SPLITS + split  # [GROUP_PAD]
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM_PAD + d[None, :], out, mask=g_mask[:, None])
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=g_mask)


@jit
def _decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, head_dim,
    stride_os, stride_oh, stride_od,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):
    # One program per (sequence, query head): weight each split by exp2(lse - max lse).
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    sp = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    row = (seq * tl.num_programs(1) + head) * NUM_SPLITS + sp  # [SPLITS_PAD]
    sp_mask = sp < NUM_SPLITS
    lse = tl.load(part_lse_ptr + row, mask=sp_mask, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # empty context: all weights 0
    w = tl.exp2(lse - lse_max)  # [SPLITS_PAD]
    parts = tl.load(part_out_ptr + row[:, None] * HEAD_DIM_PAD + d[None, :], mask=sp_mask[:, None], other=0.0)
    w_sum = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(w_sum > 0.0, w_sum, 1.0)  # [HEAD_DIM_PAD]
    tl.store(out_ptr + seq * stride_os + head * stride_oh + d * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=d < head_dim)


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, num_splits: int | None = None,
) -> torch.Tensor:
    """Decode attention for q [num_seqs, num_heads, head_dim] -> out of the same shape and dtype.

    k_cache/v_cache [num_blocks, block_size, num_kv_heads, head_dim]; block_tables [num_seqs, max_blocks]
    int32; context_lens [num_seqs] int32 (including the query token). num_splits=None picks
    from the block-table width (an upper bound of the longest context, no GPU sync).
    """
    if not use_triton(q):
        return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits)
    block_size, num_kv_heads, group = _check(q, k_cache, v_cache, block_tables, context_lens)
    num_seqs, num_heads, head_dim = q.shape
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    if num_splits is None:
        num_splits = _auto_num_splits(block_tables.shape[1] * block_size, num_seqs, num_kv_heads, q.device)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")

    head_dim_pad = max(16, next_pow2(head_dim))
    two_byte = q.element_size() <= 2
    block_n = 64 if two_byte else 32  # fp32 tiles take twice the registers
    if num_splits > 1:
        part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim_pad, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused

    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens,
        out, part_out, part_lse,
        scale * LOG2E, head_dim,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), *out.stride(),
        GROUP=group, GROUP_PAD=max(16, next_pow2(group)), BLOCK_SIZE=block_size, BLOCK_N=block_n,
        HEAD_DIM_PAD=head_dim_pad, NUM_SPLITS=num_splits, IEEE=q.dtype == torch.float32,
        num_warps=4,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            part_out, part_lse, out, head_dim, *out.stride(),
            NUM_SPLITS=num_splits, SPLITS_PAD=next_pow2(num_splits), HEAD_DIM_PAD=head_dim_pad,
            num_warps=1 if head_dim_pad <= 64 else 2,
        )
    return out

