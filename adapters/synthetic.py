"""Random LoRA adapters in PEFT's on-disk layout, for benchmarks and demos (no training needed).

The values are random but the files are exactly what `peft` saves: `adapter_config.json` and
`adapter_model.safetensors` with `base_model.model.model.layers.{i}.{self_attn|mlp}.{m}.lora_A/B.weight`,
so PEFT itself, `adapters.format` and the engine all load them.
"""

from __future__ import annotations

import json
from pathlib import Path

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def projection_dims(base_config: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of every LoRA-able projection of a Llama-family config.json."""
    h, i = base_config["hidden_size"], base_config["intermediate_size"]
    heads = base_config["num_attention_heads"]
    kv = base_config.get("num_key_value_heads") or heads
    d = base_config.get("head_dim") or h // heads
    return {"q_proj": (h, heads * d), "k_proj": (h, kv * d), "v_proj": (h, kv * d), "o_proj": (heads * d, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def write_random_lora(out_dir: Path, base_config: dict, rank: int, alpha: float, targets=ATTENTION + MLP,
                      seed: int = 0, use_rslora: bool = False, std: float = 0.02) -> Path:
    import torch
    from safetensors.torch import save_file

    dims = projection_dims(base_config)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(base_config["num_hidden_layers"]):
        for m in targets:
            parent = "self_attn" if m in ATTENTION else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{m}"
            d_in, d_out = dims[m]
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) / d_in**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * std
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / "adapter_model.safetensors")
    (out_dir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "use_rslora": use_rslora,
        "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": base_config.get("_name_or_path", "base"),
    }, indent=2))
    return out_dir


def adapter_zoo(out_dir: Path, base_config: dict, count: int, seed: int = 0) -> list[tuple[str, Path]]:
    """`count` varied adapters: ranks 8/16/32, attention-only or all projections, one rsLoRA in four."""
    ranks, zoo = (8, 16, 32), []
    for i in range(count):
        rank = ranks[i % 3]
        targets = ATTENTION if i % 2 else ATTENTION + MLP
        name = f"lora-{i}-r{rank}"
        zoo.append((name, write_random_lora(Path(out_dir) / name, base_config, rank, alpha=2.0 * rank,
                                            targets=targets, seed=seed + i, use_rslora=i % 4 == 3)))
    return zoo
