"""Runs one planned step on the model: packs tokens, builds attention metadata, returns logits."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from worker.engine.batcher import ScheduledChunk, StepPlan
from worker.engine.block_manager import BlockManager
from worker.engine.sequence import Sequence
from worker.models.attention import AttentionMetadata
from worker.models.llama import LlamaForCausalLM


@dataclass
class PromptLogits:
    """Logits at the prompt positions of one chunk whose sequence asked for prompt logprobs."""

    seq: Sequence
    positions: range  # absolute positions; the logits at q score prompt token q + 1
    logits: torch.Tensor  # [len(positions), vocab] float32


@dataclass
class StepLogits:
    sampled: torch.Tensor  # [num_sampling_chunks, vocab] float32, in the order of plan.chunks that sample
    prompt: list[PromptLogits] = field(default_factory=list)  # empty unless a sequence asked


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, lora=None,
                 kv_dtype: torch.dtype | None = None):
        cfg = model.config
        self.model = model
        self.lora = lora  # LoraRuntime when adapters are enabled
        self.device = model.embed_tokens.weight.device
        self.dtype = model.embed_tokens.weight.dtype
        self.kv_dtype = kv_dtype or self.dtype  # see EngineConfig.kv_cache_dtype
        self.block_size = block_size
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        # One (k, v) pair of [num_blocks, block_size, num_kv_heads, head_dim] per layer.
        self.kv_caches = [
            (torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
             torch.zeros(shape, dtype=self.kv_dtype, device=self.device))
            for _ in range(cfg.num_layers)
        ]

    @staticmethod
    def kv_bytes_per_block(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype) -> int:
        cfg = model.config
        return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize

    @torch.inference_mode()
    def run(self, plan: StepPlan, blocks: BlockManager) -> StepLogits:
        """The sampling rows' logits, plus every needed prompt position's for sequences that asked for
        prompt logprobs (see Sequence.prompt_logit_positions)."""
        input_ids, positions, slots, sample_rows, lora_slots = [], [], [], [], []
        prompt_rows: list[int] = []
        prompt_parts: list[tuple[Sequence, range]] = []
        for chunk in plan.chunks:
            seq, start = chunk.seq, chunk.seq.num_computed_tokens
            if seq.needs_prompt_logits:
                wanted = seq.prompt_logit_positions(start, chunk.num_tokens)
                if wanted:
                    first_row = len(input_ids) + wanted.start - start
                    prompt_rows += range(first_row, first_row + len(wanted))
                    prompt_parts.append((seq, wanted))
            for pos in range(start, start + chunk.num_tokens):
                input_ids.append(seq.token_at(pos))
                positions.append(pos)
                slots.append(blocks.slot(seq.block_table, pos))
            lora_slots += [seq.lora_slot] * chunk.num_tokens
            if chunk.samples:
                sample_rows.append(len(input_ids) - 1)
        if self.lora is not None:
            self.lora.prepare(lora_slots)
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots, torch.int64),
            num_decode_tokens=len(plan.decodes),
            decode_block_tables=self._block_tables(plan.decodes),
            decode_context_lens=self._context_lens(plan.decodes),
            prefill_block_tables=self._block_tables(plan.prefills),
            prefill_cu_seqlens=self._cu_seqlens(plan.prefills),
            prefill_context_lens=self._context_lens(plan.prefills),
        )
        hidden = self.model(self._tensor(input_ids, torch.int64), self._tensor(positions, torch.int64), self.kv_caches, meta)
        # Only the rows that pick a token need the (large) vocab projection.
        out = StepLogits(self.model.compute_logits(hidden[self._tensor(sample_rows, torch.int64)]))
        if prompt_rows:
            # A separate projection: the sampling rows go through the same path whoever else asked.
            logits = self.model.compute_logits(hidden[self._tensor(prompt_rows, torch.int64)])  # [rows, vocab]
            offset = 0
            for seq, wanted in prompt_parts:
                out.prompt.append(PromptLogits(seq, wanted, logits[offset:offset + len(wanted)]))
                offset += len(wanted)
        return out

    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def _block_tables(self, chunks: list[ScheduledChunk]) -> torch.Tensor | None:
        if not chunks:
            return None
        width = max(len(c.seq.block_table) for c in chunks)
        rows = [c.seq.block_table + [0] * (width - len(c.seq.block_table)) for c in chunks]
        return self._tensor(rows, torch.int32)  # [num_seqs, max_blocks]

    def _context_lens(self, chunks: list[ScheduledChunk]) -> torch.Tensor | None:
        if not chunks:
            return None
        return self._tensor([c.seq.num_computed_tokens + c.num_tokens for c in chunks], torch.int32)

    def _cu_seqlens(self, chunks: list[ScheduledChunk]) -> torch.Tensor | None:
        if not chunks:
            return None
        cu = [0]
        for c in chunks:
            cu.append(cu[-1] + c.num_tokens)
        return self._tensor(cu, torch.int32)
