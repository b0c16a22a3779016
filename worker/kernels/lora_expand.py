"""LoRA expand (SGMV, punica style), in place:

    out[t, off:off + out_dim] += scalings[slot] * (lora_b[slot] @ y[t])

for tokens of LoRA segments; base tokens (slot -1) are left untouched.
``out_offset`` puts one sub-projection's delta (q/k/v of a fused qkv, gate/up)
into its own column slice of the fused output.
Triton kernel on CUDA (or when forced), torch reference otherwise.
"""

from __future__ import annotations

import torch

from worker.kernels._dispatch import cdiv, jit, tl, use_triton
from worker.kernels.lora_shrink import _divisor_block, _m_block


def _check(y, lora_b, scalings, seg_indptr, seg_slots, out, out_offset) -> None:
    if y.dim() != 2 or lora_b.dim() != 3 or out.dim() != 2:
        raise ValueError(
            f"expected y [T, R], lora_b [L, out_dim, R], out [T, N], got "
            f"{tuple(y.shape)}, {tuple(lora_b.shape)}, {tuple(out.shape)}"
        )
    if lora_b.shape[2] != y.shape[1]:
        raise ValueError(f"rank mismatch: y has {y.shape[1]}, lora_b has {lora_b.shape[2]}")
    if lora_b.shape[2] % 16:
        raise ValueError(f"max_rank must be a multiple of 16, got {lora_b.shape[2]}")
    if out.shape[0] != y.shape[0]:
        raise ValueError(f"token mismatch: y has {y.shape[0]}, out has {out.shape[0]}")
    if out_offset < 0 or out_offset + lora_b.shape[1] > out.shape[1]:
        raise ValueError(f"columns {out_offset}:{out_offset + lora_b.shape[1]} exceed out width {out.shape[1]}")
    if scalings.shape != (lora_b.shape[0],):
        raise ValueError(f"scalings must be [{lora_b.shape[0]}], got {tuple(scalings.shape)}")
    if seg_indptr.numel() != seg_slots.numel() + 1:
        raise ValueError("seg_indptr must have num_segs + 1 entries")
    if not seg_indptr.is_cuda and int(seg_indptr[-1]) != y.shape[0]:
        raise ValueError(f"segments cover {int(seg_indptr[-1])} tokens, y has {y.shape[0]}")
    if not seg_slots.is_cuda and seg_slots.numel() and int(seg_slots.max()) >= lora_b.shape[0]:
        raise ValueError(f"slot {int(seg_slots.max())} out of range for {lora_b.shape[0]} loras")


def lora_expand_reference(
    y: torch.Tensor,
    lora_b: torch.Tensor,
    scalings: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    out: torch.Tensor,
    out_offset: int = 0,
) -> None:
    """Torch path (the engine's CPU path): one fp32 addmm per LoRA segment."""
    _check(y, lora_b, scalings, seg_indptr, seg_slots, out, out_offset)
    out_dim = lora_b.shape[1]
    bounds = seg_indptr.tolist()
    scales = scalings.tolist()
    for s, slot in enumerate(seg_slots.tolist()):
        lo, hi = bounds[s], bounds[s + 1]
        if slot < 0 or hi <= lo:
            continue
        view = out[lo:hi, out_offset:out_offset + out_dim]  # [n, out_dim]
        acc = view if out.dtype == torch.float32 else view.float()
        # acc += scale * (y [n, R] @ B^T [R, out_dim]), all in fp32
        acc.addmm_(y[lo:hi].float(), lora_b[slot].float().T, alpha=scales[slot])
        if acc is not view:
            view.copy_(acc)


def lora_expand(
    y: torch.Tensor,
    lora_b: torch.Tensor,
    scalings: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    out: torch.Tensor,
    out_offset: int = 0,
    *,
    max_seg_len: int | None = None,
    force_triton: bool | None = None,
) -> None:
    """Add each LoRA token's scaled B @ y into out[:, out_offset:out_offset+out_dim].

    y: [T, max_rank] (fp32 from lora_shrink); lora_b: [max_loras, out_dim, max_rank];
    scalings: [max_loras] fp32; seg_indptr: [S + 1] int32; seg_slots: [S] int32
    (-1 = no LoRA); out: [T, N >= out_offset + out_dim], updated in place.
    The kernel feeds y to the dot in lora_b's dtype when that is 16-bit
    (tensor cores, as punica does), accumulating in fp32; the reference keeps
    y in fp32, so bf16/fp16 results differ by about one rounding of y.
    """
    if not use_triton(out, force_triton):
        lora_expand_reference(y, lora_b, scalings, seg_indptr, seg_slots, out, out_offset)
        return
    _check(y, lora_b, scalings, seg_indptr, seg_slots, out, out_offset)
    _expand_triton(y, lora_b, scalings, seg_indptr, seg_slots, out, out_offset, max_seg_len)


def _expand_triton(y, lora_b, scalings, seg_indptr, seg_slots, out, out_offset, max_seg_len):
    num_tokens, max_rank = y.shape
    out_dim = lora_b.shape[1]
    num_segs = seg_slots.numel()
    if num_tokens == 0 or num_segs == 0 or out_dim == 0:
        return
    dev = out.device
    seg_indptr = seg_indptr.to(dev, torch.int32)
    seg_slots = seg_slots.to(dev, torch.int32)
    scalings = scalings.to(dev, torch.float32)
    if out.stride(1) != 1:
        raise ValueError("out must have unit column stride (it is updated in place)")

    max_len = num_tokens if max_seg_len is None else max(1, min(max_seg_len, num_tokens))
    block_m = _m_block(max_len)
    block_n = 128 if out.element_size() <= 2 else 64
    block_k = _divisor_block(max_rank)  # rank loop without masks
    m_splits = min(cdiv(max_len, block_m), 64)
    grid = (num_segs, cdiv(out_dim, block_n), m_splits)
    _expand_kernel[grid](
        y, lora_b, scalings, out, seg_indptr, seg_slots,
        out_dim, max_rank, out_offset,
        y.stride(0), y.stride(1),
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        IEEE=lora_b.dtype == torch.float32,
    )


@jit
def _expand_kernel(
    y_ptr, b_ptr, scale_ptr, out_ptr, indptr_ptr, slots_ptr,
    N, R, out_offset,
    stride_ym, stride_yk,
    stride_bl, stride_bn, stride_bk,
    stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    # grid: (segment, out-dim tile, token-chunk stride)
    seg = tl.program_id(0)
    slot = tl.load(slots_ptr + seg)
    if slot < 0:  # base-model segment: out untouched
        return
    pid_n = tl.program_id(1)
    pid_m = tl.program_id(2)
    num_m = tl.num_programs(2)
    start = tl.load(indptr_ptr + seg)
    end = tl.load(indptr_ptr + seg + 1)
    scale = tl.load(scale_ptr + slot)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    b_base = b_ptr + slot.to(tl.int64) * stride_bl
    for m0 in range(start + pid_m * BLOCK_M, end, num_m * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < end
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, R, BLOCK_K):  # BLOCK_K divides R
            offs_k = k0 + tl.arange(0, BLOCK_K)
            yt = tl.load(  # [BLOCK_M, BLOCK_K]
                y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_k[None, :] * stride_yk,
                mask=m_mask[:, None], other=0.0,
            )
            bt = tl.load(  # [BLOCK_K, BLOCK_N] = B[slot, n, k] transposed
                b_base + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk,
                mask=n_mask[None, :], other=0.0,
            )
            if IEEE:
                acc += tl.dot(yt.to(tl.float32), bt, input_precision="ieee")
            else:  # 16-bit weights: y rounded to their dtype for tensor cores
                acc += tl.dot(yt.to(bt.dtype), bt)
        o_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + (out_offset + offs_n)[None, :]
        o_mask = m_mask[:, None] & n_mask[None, :]
        cur = tl.load(o_ptrs, mask=o_mask, other=0.0)
        new = cur.to(tl.float32) + acc * scale
        tl.store(o_ptrs, new.to(cur.dtype), mask=o_mask)
