"""Build a Llama-family model from a Hugging Face model dir (config.json + safetensors).

`load_weights` is also how a full fine-tune is swapped in: it copies tensors into the existing
parameters in place, so the model is never rebuilt and the KV cache and CUDA graphs stay valid.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from worker.models.config import ModelConfig
from worker.models.llama import LlamaForCausalLM

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# HF sub-module name -> (our fused parameter, which shard of it)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = f" (found {', '.join(bins)}: pickled weights are never loaded; convert them to safetensors)" if bins else ""
        raise ValueError(f"{model_dir} has no .safetensors weights{hint}")
    return files


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


class WeightLoader:
    """Maps checkpoint names onto a model's (possibly fused) parameters and checks every one arrived."""

    def __init__(self, model: LlamaForCausalLM):
        self.model = model
        cfg = model.config
        self.params = dict(model.named_parameters())
        self.shards = {
            "self_attn.qkv_proj": (cfg.q_size, cfg.kv_size, cfg.kv_size),
            "mlp.gate_up_proj": (cfg.intermediate_size, cfg.intermediate_size),
        }

    def target(self, name: str) -> tuple[str, tuple[int, int] | None]:
        """Our parameter name for a checkpoint tensor, and its row range inside a fused parameter."""
        if name.startswith("model."):
            match = _LAYER.match(name)
            if not match:
                return name.removeprefix("model."), None
            layer, rest = match.groups()
            module, _, leaf = rest.rpartition(".")
            if module in _FUSED:
                fused, shard = _FUSED[module]
                sizes = self.shards[fused]
                start = sum(sizes[:shard])
                return f"layers.{layer}.{fused}.{leaf}", (start, start + sizes[shard])
            return f"layers.{layer}.{rest}", None
        return name, None  # lm_head.weight

    def expected(self) -> set[tuple[str, tuple[int, int] | None]]:
        out = set()
        for pname in self.params:
            fused = next((f for f in self.shards if f".{f}." in f".{pname}"), None)
            if fused is None:
                out.add((pname, None))
                continue
            sizes, start = self.shards[fused], 0
            for size in sizes:
                out.add((pname, (start, start + size)))
                start += size
        return out

    @torch.no_grad()
    def load(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        seen = set()
        tie = self.model.config.tie_word_embeddings
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (tie and name == "lm_head.weight"):
                continue
            pname, rows = self.target(name)
            param = self.params.get(pname)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {self.model.config.architecture}")
            dest = param if rows is None else param[rows[0] : rows[1]]
            if tuple(dest.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, model expects {tuple(dest.shape)}"
                )
            if not torch.isfinite(tensor).all():
                raise ValueError(f"checkpoint tensor {name!r} contains NaN or Inf")
            dest.copy_(tensor)
            seen.add((pname, rows))
        missing = self.expected() - seen
        if missing:
            names = sorted(f"{p}{'' if r is None else f'[{r[0]}:{r[1]}]'}" for p, r in missing)
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            raise ValueError(f"checkpoint is missing weights: {', '.join(names[:5])}{more}")


def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    # Materialise on the target device without a random init (weights arrive next).
    model = model.to_empty(device=device).to(dtype)
    model.rotary.__init__(cfg.rope, cfg.head_dim, cfg.max_position)  # buffers were on meta
    model.rotary.to(device)
    WeightLoader(model).load(iter_safetensors(model_dir))
    return model.requires_grad_(False).eval()
