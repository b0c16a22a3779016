"""How LoRA weights are laid out for the engine: per fused projection ("group"), per layer.

A group is one fused base matmul (qkv, o, gate_up, down). Its sub-projections' A matrices are
stacked along the rank, so one shrink serves the whole group; each sub-projection's B then expands
its rank slice into its own column slice of the fused output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters.format.targets import SUPPORTED_MODULES
from hotswap.model_dims import projection_shapes
from worker.models.config import ModelConfig

# group -> (module path inside a decoder layer, its sub-projections in output-column order). The
# sub-projections are the ones adapters.format.targets maps PEFT names onto (SUPPORTED_MODULES, same order).
GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "qkv": ("self_attn.qkv_proj", SUPPORTED_MODULES[0:3]),  # q_proj, k_proj, v_proj
    "o": ("self_attn.o_proj", SUPPORTED_MODULES[3:4]),  # o_proj
    "gate_up": ("mlp.gate_up_proj", SUPPORTED_MODULES[4:6]),  # gate_proj, up_proj
    "down": ("mlp.down_proj", SUPPORTED_MODULES[6:7]),  # down_proj
}
MODULE_GROUP = {sub: group for group, (_, subs) in GROUPS.items() for sub in subs}


def group_dims(cfg: ModelConfig, group: str) -> tuple[int, list[int]]:
    """(in_features, [out_features of each sub-projection]) of a group."""
    dims = projection_shapes(cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size)  # module -> (in, out)
    subs = GROUPS[group][1]
    return dims[subs[0]][0], [dims[s][1] for s in subs]


@dataclass
class StackedAdapter:
    """One adapter in the slot layout at its own rank r (host memory): loading it into a slot of
    max rank R copies only its r rows/columns, so a rank-8 adapter moves 8/R of a full slot."""

    name: str
    rank: int
    scaling: float
    a: dict[str, torch.Tensor]  # group -> [num_layers, len(subs), r, in]
    b: dict[str, list[torch.Tensor]]  # group -> per sub-projection B^T [num_layers, r, out_sub]
    groups: frozenset[str]  # groups the adapter touches (others get no LoRA work at all)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.a.values()) + sum(t.nbytes for bs in self.b.values() for t in bs)


def stack_adapter(name: str, tensors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], rank: int,
                  scaling: float, cfg: ModelConfig, max_rank: int, dtype: torch.dtype,
                  pin: bool = False) -> StackedAdapter:
    """tensors: (layer, module) -> (A [r, in], B [out, r]), as validated by adapters.format."""
    if rank > max_rank:
        raise ValueError(f"adapter {name!r} has rank {rank}, above the engine's max_lora_rank {max_rank}")
    L = cfg.num_layers
    touched = {MODULE_GROUP[m] for (_, m) in tensors}
    a, b = {}, {}
    for group in touched:
        in_dim, outs = group_dims(cfg, group)
        subs = GROUPS[group][1]
        a_g = torch.zeros(L, len(subs), rank, in_dim, dtype=dtype, pin_memory=pin)
        b_g = [torch.zeros(L, rank, out, dtype=dtype, pin_memory=pin) for out in outs]
        for (layer, module), (lora_a, lora_b) in tensors.items():
            if MODULE_GROUP[module] != group:
                continue
            k = subs.index(module)
            a_g[layer, k] = lora_a
            b_g[k][layer] = lora_b.T
        a[group], b[group] = a_g, b_g
    return StackedAdapter(name, rank, scaling, a, b, frozenset(touched))
