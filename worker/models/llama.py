"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) over packed tokens and a paged KV cache.

q/k/v and gate/up are fused into one matmul each: fewer kernel launches, and the LoRA layer writes
each sub-projection's contribution into its own column slice of the fused output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worker.models.attention import AttentionMetadata, paged_attention
from worker.models.config import ModelConfig
from worker.models.cpu_linear import PackedWeight
from worker.models.rope import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the model dtype (as transformers does).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class LinearSlot(nn.Module):
    """A plain linear layer that can carry a LoRA hook (set by the LoRA manager) for multi-adapter steps."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.lora = None  # callable(x, out) -> None adding LoRA deltas in place, or None
        self.packed = PackedWeight()  # decode-sized batches on CPU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.packed.linear(x, self.weight, self.bias)
        if self.lora is not None:
            self.lora(x, out)
        return out


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = LinearSlot(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = LinearSlot(cfg.q_size, cfg.hidden_size)

    def forward(self, x, positions, rotary, kv_cache, meta: AttentionMetadata):
        # x: [num_tokens, hidden]
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        q, k = rotary(positions, q, k)
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = LinearSlot(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = LinearSlot(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, positions, rotary, kv_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), positions, rotary, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.rope, cfg.head_dim, cfg.max_position)
        if cfg.tie_word_embeddings:
            self.lm_head = None  # logits use embed_tokens.weight
        else:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head_packed = PackedWeight()

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, hidden]
        x = self.embed_tokens(input_ids)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, positions, self.rotary, kv_cache, meta)
        return self.norm(x)

    def prepack(self) -> None:
        """Pack the CPU weights for decode-sized batches now rather than in the first decode step."""
        for module in self.modules():
            if isinstance(module, LinearSlot):
                module.packed.prepare(module.weight)
        self.lm_head_packed.prepare(self._logits_weight())

    def linear_sites(self) -> list[tuple[str, torch.Tensor, PackedWeight]]:
        """(name, weight [out, in], its PackedWeight) of every projection a step runs, logits included."""
        sites = [(name, m.weight, m.packed) for name, m in self.named_modules() if isinstance(m, LinearSlot)]
        return sites + [("lm_head", self._logits_weight(), self.lm_head_packed)]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [n, hidden] -> [n, vocab] in fp32 (sampling wants full precision)
        return self.lm_head_packed.linear(hidden, self._logits_weight()).float()

    def _logits_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight  # tied or not
