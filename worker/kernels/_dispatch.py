"""Shared plumbing of every kernel: the one Triton import, the one Triton-or-torch dispatch rule,
and shape checks."""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    jit = triton.jit
except ImportError:  # CPU-only installs: the torch references still work.
    triton = tl = InterpretedFunction = None

    def jit(fn):  # kernels stay plain (never launched); their annotations are lazy strings
        return fn

HAS_TRITON = triton is not None
FORCE_ENV = "HOTSWAP_FORCE_TRITON"


def use_triton(t: torch.Tensor, force: bool | None = None) -> bool:
    """Whether a kernel call on `t` runs Triton (else its torch reference).

    force=None: Triton for CUDA tensors, and for CPU tensors when HOTSWAP_FORCE_TRITON=1 (the
    interpreter tests); force=True: Triton; force=False: the reference, even on CUDA.
    """
    if force is False:
        return False
    if force is None and not t.is_cuda and os.environ.get(FORCE_ENV) != "1":
        return False
    if not HAS_TRITON:
        if force:
            raise RuntimeError("Triton was requested but is not installed: pip install 'hotswap[worker]'")
        return False  # CPU-only installs: the torch references
    if t.is_cuda:
        return True
    # Triton decides interpret-vs-compile for its own library once, when it is imported.
    if not isinstance(tl.max, InterpretedFunction):
        raise RuntimeError(
            f"{FORCE_ENV}=1 with CPU tensors needs TRITON_INTERPRET=1 set before triton is first imported"
        )
    return True


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def check_kv_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int]:
    """Validate the paged cache layout; returns (block_size, num_kv_heads, head_dim)."""
    if k_cache.dim() != 4:
        raise ValueError(
            f"k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], got {tuple(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    return block_size, num_kv_heads, head_dim


def check_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int]:
    """Validate q against the cache; returns (block_size, num_kv_heads, group = heads per kv head)."""
    block_size, num_kv_heads, head_dim = check_kv_cache(k_cache, v_cache)
    if q.dim() != 3:
        raise ValueError(f"q must be [tokens, num_heads, head_dim], got {tuple(q.shape)}")
    num_heads = q.shape[1]
    if q.shape[2] != head_dim:
        raise ValueError(f"q head_dim {q.shape[2]} != cache head_dim {head_dim}")
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if not q.is_floating_point():
        raise ValueError(f"q must be floating point, got {q.dtype}")
    return block_size, num_kv_heads, num_heads // num_kv_heads
