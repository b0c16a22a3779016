"""Random LoRA adapters in PEFT's on-disk layout, for benchmarks and demos (no training needed).

The values are random but the files are exactly what `peft` saves: `adapter_config.json` and
`adapter_model.safetensors` with `base_model.model.model.layers.{i}.{self_attn|mlp}.{m}.lora_A/B.weight`,
so PEFT itself, `adapters.format` and the engine all load them.
"""

from __future__ import annotations

import json
from pathlib import Path

from adapters.format.targets import lora_tensor_names
from hotswap.model_dims import PROJECTIONS, ModelDims

ATTENTION = tuple(m for m, parent in PROJECTIONS.items() if parent == "self_attn")  # q, k, v, o
MLP = tuple(m for m, parent in PROJECTIONS.items() if parent == "mlp")  # gate, up, down


def write_random_lora(out_dir: Path, base_config: dict, rank: int, alpha: float, targets=ATTENTION + MLP,
                      seed: int = 0, use_rslora: bool = False, std: float = 0.02) -> Path:
    import torch
    from safetensors.torch import save_file

    dims = ModelDims.from_config(base_config, "base model config", need_vocab=False).projection_shapes()  # module -> (in, out)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(base_config["num_hidden_layers"]):
        for m in targets:
            a_name, b_name = lora_tensor_names(layer, m)
            d_in, d_out = dims[m]
            tensors[a_name] = torch.randn(rank, d_in, generator=g) / d_in**0.5  # A [r, in]
            tensors[b_name] = torch.randn(d_out, rank, generator=g) * std  # B [out, r]
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
