"""Log-probabilities of chosen tokens and their top-k alternatives, from raw logits.

"Raw" as vLLM reports by default and as OpenAI documents: log_softmax in float32 of the logits the
step produced for the row (after the LoRA adapter), BEFORE penalties, temperature, top-k/top-p or
min_tokens masking. The chosen token's value and the top-k values are read from the same
log_softmax tensor, so a chosen token that is in its top-k carries the very same float in both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Rows per log_softmax when scoring a long prompt: bounds the float32 temporaries to ~_ROWS x vocab.
_ROWS = 256


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    # logits: [n, vocab] -> [n, vocab] float32 log-probabilities
    return torch.log_softmax(logits.float(), dim=-1)


def entries(logprobs: torch.Tensor, token_ids: torch.Tensor, top_k: list[int]) -> list[TokenLogprob]:
    """One TokenLogprob per row: row i's value at token_ids[i] plus its top_k[i] best tokens."""
    # logprobs: [n, vocab] from log_probs; token_ids: [n] int64 on the same device
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1).tolist()  # [n]
    k_max = max(top_k, default=0)
    tops: list[list[tuple[int, float]]] = [[] for _ in top_k]
    if k_max > 0:
        values, ids = logprobs.topk(k_max, dim=-1)  # [n, k_max], best first
        for i, (v, t) in enumerate(zip(values.tolist(), ids.tolist())):
            tops[i] = list(zip(t[:top_k[i]], v[:top_k[i]]))
    return [TokenLogprob(tid, lp, top) for tid, lp, top in zip(token_ids.tolist(), chosen, tops)]


def next_token_entries(logits: torch.Tensor, next_ids: list[int], k: int) -> list[TokenLogprob]:
    """Prompt logprobs: row i holds the logits at some position, next_ids[i] the token that follows it."""
    # logits: [m, vocab] raw, m == len(next_ids)
    out: list[TokenLogprob] = []
    targets = torch.tensor(next_ids, dtype=torch.int64, device=logits.device)  # [m]
    for start in range(0, len(next_ids), _ROWS):
        end = start + _ROWS
        out += entries(log_probs(logits[start:end]), targets[start:end], [k] * len(targets[start:end]))
    return out
