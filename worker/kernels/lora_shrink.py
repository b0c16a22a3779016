"""LoRA shrink (SGMV, punica style): y[t] = lora_a[slot(t)] @ x[t].

x [num_tokens, in_dim] -> y [num_tokens, max_rank] float32, per segment of
tokens sharing one adapter slot; base segments (slot -1) give y = 0.
Triton kernel on CUDA (or when forced), torch reference otherwise.
"""

from __future__ import annotations

import torch

from worker.kernels._dispatch import cdiv, jit, tl, use_triton


def _check(x: torch.Tensor, lora_a: torch.Tensor, seg_indptr: torch.Tensor, seg_slots: torch.Tensor) -> None:
    if x.dim() != 2 or lora_a.dim() != 3:
        raise ValueError(f"expected x [T, in] and lora_a [L, R, in], got {tuple(x.shape)}, {tuple(lora_a.shape)}")
    if lora_a.shape[2] != x.shape[1]:
        raise ValueError(f"in_dim mismatch: x has {x.shape[1]}, lora_a has {lora_a.shape[2]}")
    if lora_a.shape[1] % 16:
        raise ValueError(f"max_rank must be a multiple of 16, got {lora_a.shape[1]}")
    if x.dtype != lora_a.dtype:
        raise ValueError(f"x and lora_a must share a dtype, got {x.dtype} and {lora_a.dtype}")
    if seg_indptr.numel() != seg_slots.numel() + 1:
        raise ValueError("seg_indptr must have num_segs + 1 entries")
    # Content checks only where they cost no device sync.
    if not seg_indptr.is_cuda and int(seg_indptr[-1]) != x.shape[0]:
        raise ValueError(f"segments cover {int(seg_indptr[-1])} tokens, x has {x.shape[0]}")
    if not seg_slots.is_cuda and seg_slots.numel() and int(seg_slots.max()) >= lora_a.shape[0]:
        raise ValueError(f"slot {int(seg_slots.max())} out of range for {lora_a.shape[0]} loras")


def lora_shrink_reference(
    x: torch.Tensor, lora_a: torch.Tensor, seg_indptr: torch.Tensor, seg_slots: torch.Tensor
) -> torch.Tensor:
    """Torch path (the engine's CPU path): one fp32 matmul per LoRA segment."""
    _check(x, lora_a, seg_indptr, seg_slots)
    y = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    bounds = seg_indptr.tolist()
    for s, slot in enumerate(seg_slots.tolist()):
        lo, hi = bounds[s], bounds[s + 1]
        if slot < 0 or hi <= lo:
            continue
        # [n, in] @ [in, R] written straight into the contiguous rows of y.
        torch.mm(x[lo:hi].float(), lora_a[slot].float().T, out=y[lo:hi])
    return y


def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    *,
    max_seg_len: int | None = None,
    split_k: int | None = None,
    force_triton: bool | None = None,
) -> torch.Tensor:
    """y [T, max_rank] fp32 = per-segment lora_a[slot] @ x; 0 for base tokens.

    x: [T, in_dim]; lora_a: [max_loras, max_rank, in_dim] (same dtype as x);
    seg_indptr: [S + 1] int32; seg_slots: [S] int32 (-1 = no LoRA).
    max_seg_len: longest segment if the caller knows it (sizes the grid
    without a device sync); split_k: K splits (None = heuristic, 1 =
    deterministic, no atomics). force_triton: see _dispatch.use_triton.
    """
    if not use_triton(x, force_triton):
        return lora_shrink_reference(x, lora_a, seg_indptr, seg_slots)
    _check(x, lora_a, seg_indptr, seg_slots)
    return _shrink_triton(x, lora_a, seg_indptr, seg_slots, max_seg_len, split_k)


def _divisor_block(n: int) -> int:
    """Largest of 64/32/16 dividing n (n is a multiple of 16): no rank masks."""
    return next(b for b in (64, 32, 16) if n % b == 0)


def _m_block(max_len: int) -> int:
    # Decode segments are a few tokens: don't burn a 64-row tile on them.
    return 16 if max_len <= 16 else 32 if max_len <= 32 else 64


def _shrink_triton(x, lora_a, seg_indptr, seg_slots, max_seg_len, split_k):
    num_tokens, in_dim = x.shape
    max_rank = lora_a.shape[1]
    num_segs = seg_slots.numel()
    y = torch.zeros(num_tokens, max_rank, dtype=torch.float32, device=x.device)
    if num_tokens == 0 or num_segs == 0:
        return y
    seg_indptr = seg_indptr.to(x.device, torch.int32)
    seg_slots = seg_slots.to(x.device, torch.int32)
    x = x if x.stride(1) == 1 else x.contiguous()

    max_len = num_tokens if max_seg_len is None else max(1, min(max_seg_len, num_tokens))
    block_m = _m_block(max_len)
    block_n = _divisor_block(max_rank)
    block_k = 128 if x.element_size() <= 2 else 64
    n_tiles = max_rank // block_n
    # Token chunks of one segment are spread over grid dim 2 (grid-stride loop);
    # programs past the end of a short segment exit at once.
    m_splits = min(cdiv(max_len, block_m), 64)
    k_blocks = cdiv(in_dim, block_k)
    if split_k is None:
        # Few busy programs (decode, one big in_dim) -> split in_dim, keeping
        # >= 4 K blocks per split; work estimate is an upper bound, no sync.
        busy = n_tiles * (cdiv(num_tokens, block_m) + num_segs)
        split_k = max(1, min(256 // busy, k_blocks // 4, 16))
    split_k = max(1, min(split_k, k_blocks))
    k_per_split = cdiv(k_blocks, split_k) * block_k

    grid = (num_segs, n_tiles * split_k, m_splits)
    _shrink_kernel[grid](
        x, lora_a, y, seg_indptr, seg_slots,
        in_dim, k_per_split,
        x.stride(0), x.stride(1),
        lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        y.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        IEEE=x.dtype == torch.float32,
    )
    return y


@jit
def _shrink_kernel(
    x_ptr, a_ptr, y_ptr, indptr_ptr, slots_ptr,
    K, k_per_split,
    stride_xm, stride_xk,
    stride_al, stride_ar, stride_ak,
    stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, IEEE: tl.constexpr,
):
    # grid: (segment, rank tile * K split, token-chunk stride)
    seg = tl.program_id(0)
    slot = tl.load(slots_ptr + seg)
    if slot < 0:  # base-model segment: y stays 0
        return
    pid_n = tl.program_id(1) // SPLIT_K
    pid_k = tl.program_id(1) % SPLIT_K
    pid_m = tl.program_id(2)
    num_m = tl.num_programs(2)
    start = tl.load(indptr_ptr + seg)
    end = tl.load(indptr_ptr + seg + 1)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # BLOCK_N divides max_rank
    a_base = a_ptr + slot.to(tl.int64) * stride_al
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    for m0 in range(start + pid_m * BLOCK_M, end, num_m * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < end
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            xt = tl.load(  # [BLOCK_M, BLOCK_K]
                x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=m_mask[:, None] & k_mask[None, :], other=0.0,
            )
            at = tl.load(  # [BLOCK_K, BLOCK_N] = A[slot, n, k] transposed
                a_base + offs_n[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                mask=k_mask[:, None], other=0.0,
            )
            if IEEE:  # fp32 inputs: exact fp32, not TF32
                acc += tl.dot(xt, at, input_precision="ieee")
            else:
                acc += tl.dot(xt, at)
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        if SPLIT_K == 1:
            tl.store(y_ptrs, acc, mask=m_mask[:, None])
        else:  # partial sums over K splits meet in the zeroed y
            tl.atomic_add(y_ptrs, acc, mask=m_mask[:, None])
