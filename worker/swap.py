"""Full fine-tunes: same-architecture checkpoints copied into the resident model in place.

The model is never rebuilt: a swap is one copy per tensor from host memory (pinned on CUDA, so the
copies run at full PCIe bandwidth) into the existing parameters. Host copies of several
checkpoints are kept (LRU); the base model's own weights are always kept, so swapping back is cheap.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from worker.engine.errors import AdapterError
from worker.models.config import ModelConfig
from worker.models.llama import LlamaForCausalLM
from worker.models.loader import WeightLoader, iter_safetensors

BASE = None  # the name under which the base weights are swapped back in


class FullModelSwapper:
    def __init__(self, model: LlamaForCausalLM, max_cpu_models: int = 2):
        self.model = model
        self.max_cpu_models = max_cpu_models
        self.paths: dict[str, Path] = {}
        self.current: str | None = BASE
        pin = model.embed_tokens.weight.is_cuda
        # The base in the model's own layout: swapping back is one plain copy per parameter.
        self._base = {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()}
        if pin:
            self._base = {k: v.pin_memory() for k, v in self._base.items()}
        self._host: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.num_swaps = 0

    def register(self, name: str, path: str | Path) -> None:
        """Check that the checkpoint fits the resident model (same architecture and dims)."""
        path = Path(path)
        theirs = ModelConfig.from_dir(path)
        ours = self.model.config
        if theirs.architecture != ours.architecture or not ours.same_shape_as(theirs):
            raise AdapterError(
                f"full fine-tune {name!r} is a {theirs.architecture} with hidden_size {theirs.hidden_size}, "
                f"{theirs.num_layers} layers; the resident base is a {ours.architecture} with hidden_size "
                f"{ours.hidden_size}, {ours.num_layers} layers: only same-architecture fine-tunes can be swapped in"
            )
        self.paths[name] = path
        self._host.pop(name, None)  # a re-registration replaces the old weights

    def forget(self, name: str) -> None:
        self.paths.pop(name, None)
        self._host.pop(name, None)

    @torch.no_grad()
    def swap_to(self, name: str | None) -> None:
        if name == self.current:
            return
        if name is BASE:
            self._copy_ours(self._base)
        elif name in self._host:
            self._copy_ours(self._host[name])
            self._host.move_to_end(name)
        else:
            self._load_from_disk(name)
        if self.model.embed_tokens.weight.is_cuda:
            torch.cuda.synchronize()
        self.current = name
        self.num_swaps += 1

    def _copy_ours(self, weights: dict[str, torch.Tensor]) -> None:
        for pname, param in self.model.named_parameters():
            param.copy_(weights[pname], non_blocking=True)

    def _load_from_disk(self, name: str) -> None:
        """First use: the loader validates every tensor (names, shapes, finite) while copying it in;
        then a host snapshot in the model's own layout makes the next swaps plain copies."""
        if name not in self.paths:
            raise KeyError(f"no full fine-tune named {name!r} is registered")
        try:
            WeightLoader(self.model).load(iter_safetensors(self.paths[name]))
        except Exception:
            self._copy_ours(self._base)  # never leave a half-swapped model behind
            self.current = BASE
            raise
        pin = self.model.embed_tokens.weight.is_cuda
        snapshot = {}
        for pname, p in self.model.named_parameters():
            host = p.detach().to("cpu", copy=True)
            snapshot[pname] = host.pin_memory() if pin else host
        self._host[name] = snapshot
        while len(self._host) > self.max_cpu_models:
            self._host.popitem(last=False)
