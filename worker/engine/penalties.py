"""Logit adjustments that depend on a request's tokens so far: penalties and min_tokens.

Pure tensor functions over the rows that need them (the sampler picks those rows). Token histories
come in as plain lists and become flat (row * vocab + token) indices, so the work is proportional
to the history lengths, not to rows x vocab: only the logits of tokens seen are read and written.

Order (as vLLM's apply_penalties): repetition penalty, then frequency, then presence.
- repetition_penalty r (vLLM / HF, prompt AND output tokens): a seen token's logit x becomes x / r
  when x > 0, else x * r.
- frequency_penalty f, presence_penalty p (OpenAI, output tokens only): x - f * count - p * (count > 0).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch


def token_counts(token_ids: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """How often each token occurs in each row's list: [len(token_ids), vocab] int64 (dense; for tests
    and small vocabularies; the penalties themselves use the sparse form)."""
    keys, counts = _occurrences(range(len(token_ids)), token_ids, vocab, device)
    out = torch.zeros(len(token_ids) * vocab, dtype=torch.int64, device=device)
    out[keys] = counts
    return out.view(len(token_ids), vocab)


def apply_penalties(
    logits: torch.Tensor,  # [n, vocab] float32
    prompt_ids: list[list[int]],  # per row
    output_ids: list[list[int]],  # per row
    presence: list[float],
    frequency: list[float],
    repetition: list[float],
) -> torch.Tensor:  # [n, vocab], a new tensor (the input is left alone)
    return penalize_(logits.clone(), range(logits.shape[0]), prompt_ids, output_ids, presence, frequency, repetition)


def penalize_(logits: torch.Tensor, rows: Sequence[int], prompt_ids: list[list[int]], output_ids: list[list[int]],
              presence: list[float], frequency: list[float], repetition: list[float]) -> torch.Tensor:
    """apply_penalties in place on the given rows of logits [num_rows, vocab]; the others untouched."""
    vocab, device, dtype = logits.shape[1], logits.device, logits.dtype
    flat = logits.view(-1)  # [num_rows * vocab]
    out_keys, out_counts = _occurrences(rows, output_ids, vocab, device)  # [k] unique, [k]
    if any(r != 1.0 for r in repetition):
        prompt_keys, _ = _occurrences(rows, prompt_ids, vocab, device)
        seen = torch.unique(torch.cat((prompt_keys, out_keys)))  # [s] flat indices of seen tokens
        r = _per_row(repetition, rows, logits.shape[0], dtype, device)[seen // vocab]  # [s]
        x = flat[seen]
        flat[seen] = torch.where(x > 0, x / r, x * r)
    if out_keys.numel() and (any(f != 0.0 for f in frequency) or any(p != 0.0 for p in presence)):
        owner = out_keys // vocab  # [k] row of each output token
        f = _per_row(frequency, rows, logits.shape[0], dtype, device)[owner]
        p = _per_row(presence, rows, logits.shape[0], dtype, device)[owner]
        flat[out_keys] = flat[out_keys] - f * out_counts.to(dtype) - p
    return logits


def ban_tokens_(logits: torch.Tensor, rows: Sequence[int], banned: list[list[int]]) -> torch.Tensor:
    """Set banned tokens of the given rows to -inf in place (min_tokens: EOS and stop tokens)."""
    # logits: [num_rows, vocab]; banned: per entry of rows, token ids
    row_index = [r for r, ids in zip(rows, banned) for _ in ids]
    if row_index:
        device = logits.device
        index = (torch.tensor(row_index, device=device),
                 torch.tensor(list(itertools.chain.from_iterable(banned)), device=device))
        logits.index_put_(index, torch.tensor(float("-inf"), dtype=logits.dtype, device=device))
    return logits


def ban_tokens(logits: torch.Tensor, banned: list[list[int]]) -> torch.Tensor:
    """ban_tokens_ on a copy, one list of banned ids per row."""
    return ban_tokens_(logits.clone(), range(logits.shape[0]), banned)


def _occurrences(rows: Sequence[int], token_ids: list[list[int]], vocab: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique flat indices (row * vocab + token) of the tokens in each row's list, and their counts."""
    lengths = torch.tensor([len(ids) for ids in token_ids], device=device)  # [n]
    tokens = torch.tensor(list(itertools.chain.from_iterable(token_ids)), dtype=torch.int64, device=device)  # [total]
    owners = torch.repeat_interleave(torch.tensor(list(rows), dtype=torch.int64, device=device), lengths)  # [total]
    return torch.unique(owners * vocab + tokens, return_counts=True)


def _per_row(values: list[float], rows: Sequence[int], num_rows: int, dtype, device) -> torch.Tensor:
    # [num_rows]: values[j] at rows[j], 0 elsewhere (never read there)
    out = torch.zeros(num_rows, dtype=dtype, device=device)
    out[torch.tensor(list(rows), dtype=torch.int64, device=device)] = torch.tensor(values, dtype=dtype, device=device)
    return out
