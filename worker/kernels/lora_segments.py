"""Segments for the multi-LoRA (SGMV) kernels.

An engine step packs its tokens so that tokens of one adapter are contiguous.
A "segment" is one such run: tokens ``seg_indptr[s] : seg_indptr[s + 1]`` all
use adapter slot ``seg_slots[s]`` (``-1`` = base model, no LoRA).

Pure python/torch, no Triton: built on the host once per step and shared by
every layer's shrink/expand calls.
"""

from __future__ import annotations

from typing import Sequence

import torch

BASE_SLOT = -1  # slot id of tokens that get no LoRA contribution


def build_segments(
    token_slots: Sequence[int] | torch.Tensor,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split per-token slot ids into runs of equal consecutive values.

    token_slots: [num_tokens] int, each >= -1.
    Returns (seg_indptr [num_segs + 1] int32, seg_slots [num_segs] int32) on
    ``device`` (default: the input tensor's device, CPU for a list).
    Adjacent equal slots merge; repeats that are not adjacent stay separate
    segments (the kernels do not need slots to be unique).
    """
    if isinstance(token_slots, torch.Tensor):
        if device is None:
            device = token_slots.device
        t = token_slots.detach().to("cpu", torch.int64)
    else:
        t = torch.as_tensor(list(token_slots), dtype=torch.int64)
    if t.dim() != 1:
        raise ValueError(f"token_slots must be 1-D, got shape {tuple(t.shape)}")
    n = t.numel()
    if n and int(t.min()) < BASE_SLOT:
        raise ValueError("token slots must be >= -1 (-1 means base model)")
    if n == 0:
        indptr = torch.zeros(1, dtype=torch.int32)
        slots = torch.zeros(0, dtype=torch.int32)
    else:
        # A segment starts at token 0 and wherever the slot changes.
        starts = torch.cat(
            [torch.zeros(1, dtype=torch.int64), torch.nonzero(t[1:] != t[:-1]).flatten() + 1]
        )
        indptr = torch.cat([starts, torch.tensor([n])]).to(torch.int32)
        slots = t[starts].to(torch.int32)
    if device is not None:
        indptr, slots = indptr.to(device), slots.to(device)
    return indptr, slots


def max_segment_len(seg_indptr: torch.Tensor) -> int:
    """Longest segment in tokens (0 if none); sizes the kernels' token-split grid.

    Call it on the host copy of seg_indptr: on a CUDA tensor it synchronizes.
    """
    if seg_indptr.numel() < 2:
        return 0
    return int((seg_indptr[1:] - seg_indptr[:-1]).max())
