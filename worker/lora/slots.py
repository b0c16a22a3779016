"""GPU slots for LoRA adapters, a host tier behind them, and LRU eviction.

Every group (see layout.py) has one stacked buffer per A/B across all layers and slots, so loading
an adapter into a slot is at most 11 strided copies (4 A + 7 B) of its own rank's rows, whatever the
number of layers (LoRAX-style per-layer copies are what makes their loads take 0.5-1 s).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from worker.lora.layout import GROUPS, StackedAdapter, group_dims
from worker.models.config import ModelConfig


class LoraSlots:
    def __init__(self, cfg: ModelConfig, max_loras: int, max_rank: int, max_cpu_loras: int,
                 device: torch.device, dtype: torch.dtype, load_host: Callable[[str], StackedAdapter]):
        if max_rank % 16 or max_rank < 16:
            raise ValueError(f"max_lora_rank must be a positive multiple of 16, got {max_rank}")
        if max_cpu_loras < max_loras:
            raise ValueError("max_cpu_loras must be at least max_loras")
        self.max_loras, self.max_rank, self.max_cpu_loras = max_loras, max_rank, max_cpu_loras
        self.device, self.dtype = device, dtype
        self._load_host = load_host  # name -> StackedAdapter read from disk (on a host-tier miss)
        L, R = cfg.num_layers, max_rank
        self.a: dict[str, torch.Tensor] = {}  # group -> [L, max_loras, n_sub * R, in]
        # B is stored transposed: rank-major rows read contiguously (on a CPU the [R, out] product
        # runs ~1.5x faster than [out, R]^T); the kernels take it as a strided [out, R] view.
        self.b: dict[str, list[torch.Tensor]] = {}  # group -> per sub B^T [L, max_loras, R, out_sub]
        for group, (_, subs) in GROUPS.items():
            in_dim, outs = group_dims(cfg, group)
            self.a[group] = torch.zeros(L, max_loras, len(subs) * R, in_dim, dtype=dtype, device=device)
            self.b[group] = [torch.zeros(L, max_loras, R, out, dtype=dtype, device=device) for out in outs]
        self.scalings = torch.zeros(max_loras, dtype=torch.float32, device=device)  # [max_loras]
        self.slot_groups: list[frozenset[str]] = [frozenset()] * max_loras
        self.slot_ranks = [0] * max_loras  # rank of each slot's adapter: rows beyond it are zero
        # Per slot and group: how many rank rows may hold non-zero weights (all zero at start).
        self._dirty_rank = [{g: 0 for g in GROUPS} for _ in range(max_loras)]
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self._users = [0] * max_loras  # running sequences using each slot (never evicted while > 0)
        self._host: OrderedDict[str, StackedAdapter] = OrderedDict()
        self.num_loads = 0

    def held(self) -> list[str]:
        """Adapters in a device slot or in host memory: loading these again costs (almost) nothing."""
        return list(dict.fromkeys([*self._resident, *self._host]))

    def in_use(self, name: str) -> bool:
        slot = self._resident.get(name)
        return slot is not None and self._users[slot] > 0

    def acquire(self, name: str) -> int | None:
        """A slot holding `name` (loading it if needed), or None if every slot is busy."""
        slot = self._resident.get(name)
        if slot is None:
            slot = self._free_slot(name)
            if slot is None:
                return None
            self._load(name, slot)
        self._resident.move_to_end(name)
        self._users[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        if self._users[slot] <= 0:
            raise RuntimeError(f"LoRA slot {slot} released more often than acquired")
        self._users[slot] -= 1

    def forget(self, name: str) -> None:
        """Drop an adapter from both tiers (deleted, or replaced by a new upload under the name)."""
        self._host.pop(name, None)
        self.evict(name)

    def evict(self, name: str) -> bool:
        """Free `name`'s device slot now (its host copy stays). False if absent or in use."""
        slot = self._resident.get(name)
        if slot is None or self._users[slot] > 0:
            return False
        del self._resident[name]
        self.slot_groups[slot] = frozenset()
        return True

    def host_adapter(self, name: str) -> StackedAdapter:
        adapter = self._host.get(name)
        if adapter is None:
            adapter = self._load_host(name)
            self._host[name] = adapter
            while len(self._host) > self.max_cpu_loras:
                self._host.popitem(last=False)
        self._host.move_to_end(name)
        return adapter

    def _free_slot(self, name: str) -> int | None:
        used = set(self._resident.values())
        free = [slot for slot in range(self.max_loras) if slot not in used]
        if free:
            # Adapters touching every group fill slots from the bottom, the others from the top, so
            # each group's adapters tend to sit in neighbouring slots: the CPU path batches a run of
            # neighbouring slots in one matmul (cpu_batched.py).
            return free[0] if self.host_adapter(name).groups == frozenset(GROUPS) else free[-1]
        for resident, slot in self._resident.items():  # least recently used first
            if self._users[slot] == 0:
                del self._resident[resident]
                return slot
        return None

    @torch.no_grad()
    def _load(self, name: str, slot: int) -> None:
        adapter = self.host_adapter(name)
        r, R = adapter.rank, self.max_rank
        for group in adapter.groups:
            # One strided copy per tensor for all layers; rows a previous, higher-rank tenant of the
            # slot left beyond rank r are zeroed (the rest of the padding is zero already). Groups
            # the adapter does not touch keep stale rows: the hooks skip them for this slot.
            stale = self._dirty_rank[slot][group]
            a_slot = self.a[group][:, slot].unflatten(1, (-1, R))  # [L, n_sub, R, in]
            a_slot[:, :, :r].copy_(adapter.a[group], non_blocking=True)
            a_slot[:, :, r:stale].zero_()
            for dst, src in zip(self.b[group], adapter.b[group]):
                dst[:, slot, :r].copy_(src, non_blocking=True)  # [L, r, out]
                dst[:, slot, r:stale].zero_()
            self._dirty_rank[slot][group] = r
        self.scalings[slot] = adapter.scaling
        self.slot_groups[slot] = adapter.groups
        self.slot_ranks[slot] = r
        self._resident[name] = slot
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self.num_loads += 1
