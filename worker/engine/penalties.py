"""Logit adjustments that depend on a request's tokens so far: penalties and min_tokens.

Pure tensor functions over the rows that need them (the sampler picks those rows); token histories
come in as plain lists and become count tensors with one bincount per call, so the cost is one
[rows, vocab] pass plus the history length, and rows without penalties never get here.

Order (as vLLM's apply_penalties): repetition penalty, then frequency, then presence.
- repetition_penalty r (vLLM / HF, prompt AND output tokens): a seen token's logit x becomes x / r
  when x > 0, else x * r.
- frequency_penalty f, presence_penalty p (OpenAI, output tokens only): x - f * count - p * (count > 0).
"""

from __future__ import annotations

import itertools

import torch


def token_counts(token_ids: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """How often each token occurs in each row's list: [len(token_ids), vocab] int64."""
    n = len(token_ids)
    lengths = torch.tensor([len(ids) for ids in token_ids], device=device)  # [n]
    flat = torch.tensor(list(itertools.chain.from_iterable(token_ids)), dtype=torch.int64, device=device)  # [total]
    rows = torch.repeat_interleave(torch.arange(n, device=device), lengths)  # [total]
    return torch.bincount(rows * vocab + flat, minlength=n * vocab).view(n, vocab)


def apply_penalties(
    logits: torch.Tensor,  # [n, vocab] float32
    prompt_ids: list[list[int]],  # per row
    output_ids: list[list[int]],  # per row
    presence: list[float],
    frequency: list[float],
    repetition: list[float],
) -> torch.Tensor:  # [n, vocab], a new tensor (the input is left alone)
    vocab, device = logits.shape[1], logits.device
    counts = token_counts(output_ids, vocab, device)  # [n, vocab]
    in_output = counts > 0  # [n, vocab] bool
    if any(r != 1.0 for r in repetition):
        seen = in_output | (token_counts(prompt_ids, vocab, device) > 0)  # [n, vocab]
        r = torch.tensor(repetition, dtype=logits.dtype, device=device).unsqueeze(1)  # [n, 1]
        logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    if any(f != 0.0 for f in frequency):
        f = torch.tensor(frequency, dtype=logits.dtype, device=device).unsqueeze(1)  # [n, 1]
        logits = logits - f * counts.to(logits.dtype)
    if any(p != 0.0 for p in presence):
        p = torch.tensor(presence, dtype=logits.dtype, device=device).unsqueeze(1)  # [n, 1]
        logits = logits - p * in_output.to(logits.dtype)
    return logits


def ban_tokens(logits: torch.Tensor, banned: list[list[int]]) -> torch.Tensor:
    """Set each row's banned tokens to -inf (min_tokens: EOS and stop tokens). A new tensor."""
    # logits: [n, vocab]; banned: per row, token ids
    rows = [i for i, ids in enumerate(banned) for _ in ids]
    cols = list(itertools.chain.from_iterable(banned))
    if not cols:
        return logits
    device = logits.device
    index = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
    return logits.index_put(index, torch.tensor(float("-inf"), dtype=logits.dtype, device=device))
