"""Engine settings, validated with messages a user can act on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class EngineConfig:
    model: str | Path
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on GPU and on CPUs with native bf16, else fp32) | float32 | bfloat16 | float16
    block_size: int = 16
    num_blocks: int | None = None  # None: sized from kv_cache_gb (CPU) or gpu_memory_utilization (GPU)
    kv_cache_gb: float = 1.0  # CPU KV cache size when num_blocks is None
    kv_cache_dtype: str = "auto"  # auto (float32 on the CPU, the model's dtype elsewhere) | float32 | bfloat16 | float16
    gpu_memory_utilization: float = 0.85  # fraction of the GPU the engine may use, weights included
    max_num_seqs: int = 64  # sequences in flight at once
    max_num_batched_tokens: int = 1024  # tokens per step (prefill chunks + decodes)
    max_model_len: int | None = None  # prompt + output cap (default: the model's, at most 32k)
    max_loras: int = 0  # LoRA adapters resident on the device at once (0: LoRA off, no buffers)
    max_lora_rank: int = 64  # adapters of higher rank are refused; a multiple of 16
    max_cpu_loras: int | None = None  # adapters kept in (pinned) host memory (default 4 x max_loras)
    max_cpu_finetunes: int = 2  # full fine-tunes kept in host memory besides the base
    enable_prefix_caching: bool = True  # reuse full KV blocks of equal prefixes under equal weights
    cpu_tuning: str = "auto"  # CPU matmul paths: auto (measure once, cached) | remeasure | off (fixed rule)
    cpu_tuning_cache: Path | None = None  # dir of the measured timings (None: this process only)

    def __post_init__(self):
        if self.block_size < 8 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 8, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs (every decode needs a token)")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        if self.max_loras < 0:
            raise ValueError("max_loras must be >= 0")
        if self.max_lora_rank < 16 or self.max_lora_rank % 16:
            raise ValueError(f"max_lora_rank must be a positive multiple of 16, got {self.max_lora_rank}")
        if self.cpu_tuning not in ("auto", "remeasure", "off"):
            raise ValueError(f"cpu_tuning must be auto, remeasure or off; got {self.cpu_tuning!r}")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked for but no CUDA device is available")
        return device

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return default_dtype(device)
        return _named_dtype("dtype", self.dtype)

    def kv_torch_dtype(self, device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
        """The KV cache's dtype. On the CPU "auto" is float32 whatever the model's dtype: the CPU's bf16
        attention kernels ran ~5x slower than fp32 at decode shapes on a Zen 4 with AVX512_BF16 (SDPA
        31 vs 5 ms, the K/V gather 8.9 vs 5.0 ms per step of 16 sequences at ~400 tokens), and a bf16
        model's K/V convert to fp32 exactly, so the cache holds the same values at twice the bytes."""
        if self.kv_cache_dtype == "auto":
            return torch.float32 if device.type == "cpu" else model_dtype
        return _named_dtype("kv_cache_dtype", self.kv_cache_dtype)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _named_dtype(setting: str, name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"{setting} must be one of auto, {', '.join(_DTYPES)}; got {name!r}")
    return _DTYPES[name]


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs and on CPUs that compute it natively (AVX512_BF16 or AMX); fp32 on other CPUs,
    where bf16 matmuls are converted to fp32 and back and run slower than fp32."""
    from worker.models.cpu_facts import cpu_has_native_bf16

    return torch.bfloat16 if device.type == "cuda" or cpu_has_native_bf16() else torch.float32
