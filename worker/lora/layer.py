"""Applies the LoRA of many adapters inside one step: per-step segments and per-layer hooks.

Tokens of a step are packed so that each adapter's tokens are contiguous (the batcher orders
sequences by slot); every group of every layer then runs one shrink and one expand per
sub-projection over those segments. A step without adapter tokens removes the hooks: zero LoRA work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.kernels.lora_expand import lora_expand
from worker.kernels._dispatch import use_triton
from worker.kernels.lora_segments import build_segments, max_segment_len
from worker.kernels.lora_shrink import lora_shrink
from worker.lora.cpu_batched import Run, RunWeights, expand_run, plan_runs, run_weights, shrink_run, to_run
from worker.lora.layout import GROUPS
from worker.lora.slots import LoraSlots
from worker.models.llama import LlamaForCausalLM


@dataclass
class Segments:
    indptr: torch.Tensor  # [num_segs + 1] int32
    slots: torch.Tensor  # [num_segs] int32, -1 = no LoRA
    max_len: int


class LoraRuntime:
    def __init__(self, model: LlamaForCausalLM, slots: LoraSlots):
        self.model, self.slots = model, slots
        self.segments: dict[str, Segments | None] = {g: None for g in GROUPS}
        # On a CPU (fp32 or bf16): batched matmuls over runs of slots (cpu_batched.py) instead of the
        # kernels' per-segment references.
        self.cpu_batched = not use_triton(slots.scalings) and slots.dtype in (torch.float32, torch.bfloat16)
        self.runs: dict[str, list[Run]] = {g: [] for g in GROUPS}
        self.active = False
        self._hooks = [
            (layer.get_submodule(path), self._hook(i, group))
            for i, layer in enumerate(model.layers)
            for group, (path, _) in GROUPS.items()
        ]

    def prepare(self, token_slots: list[int]) -> None:
        """Set up the next step. token_slots: [num_tokens] slot per packed token (-1 = base)."""
        if max(token_slots, default=-1) < 0:  # base-only step (the common case): nothing to build
            self._set_active(False)
            return
        any_lora = False
        scalings = self.slots.scalings.tolist() if self.cpu_batched else []
        ranks = self.slots.slot_ranks
        for group in GROUPS:
            # An adapter that does not touch this group counts as base here: no wasted work.
            group_slots = [s if s >= 0 and group in self.slots.slot_groups[s] else -1 for s in token_slots]
            if all(s < 0 for s in group_slots):
                self.segments[group], self.runs[group] = None, []
                continue
            any_lora = True
            if self.cpu_batched:
                self.runs[group] = [to_run(plan, scalings, ranks) for plan in plan_runs(group_slots)]
                continue
            indptr, seg_slots = build_segments(group_slots)
            self.segments[group] = Segments(indptr.to(self.slots.device), seg_slots.to(self.slots.device),
                                            max_segment_len(indptr))
        self._set_active(any_lora)

    def _set_active(self, active: bool) -> None:
        if active != self.active:
            for module, hook in self._hooks:
                module.lora = hook if active else None
            self.active = active

    def _hook(self, layer: int, group: str):
        slots, R = self.slots, self.slots.max_rank

        # Views of this layer's slot weights per (first slot, slots, rank): decode steps reuse them.
        views: dict[tuple[int, int, int], RunWeights] = {}

        def apply_batched(x: torch.Tensor, out: torch.Tensor) -> None:
            for run in self.runs[group]:
                key = (run.first, run.num_slots, run.rank)
                w = views.get(key)
                if w is None:
                    w = views[key] = run_weights(slots.a[group][layer], [bt[layer] for bt in slots.b[group]], *key)
                offset = 0
                for y, b_t in zip(shrink_run(x, w, run), w.b_t):
                    width = b_t.shape[2]
                    expand_run(y, b_t, run, out[:, offset:offset + width])
                    offset += width

        def apply(x: torch.Tensor, out: torch.Tensor) -> None:
            # x: [num_tokens, in], out: [num_tokens, sum(out_sub)] updated in place
            seg = self.segments[group]
            if seg is None:
                return
            y = lora_shrink(x, slots.a[group][layer], seg.indptr, seg.slots, max_seg_len=seg.max_len)  # [T, n*R]
            offset = 0
            for k, bt in enumerate(slots.b[group]):
                # bt[layer]: [max_loras, R, out_sub]; the kernels take B as [max_loras, out_sub, R]
                lora_expand(y[:, k * R : (k + 1) * R], bt[layer].transpose(1, 2), slots.scalings, seg.indptr,
                            seg.slots, out, offset, max_seg_len=seg.max_len)
                offset += bt.shape[3]

        return apply_batched if self.cpu_batched else apply
