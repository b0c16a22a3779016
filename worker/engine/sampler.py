"""Turns one step's logits into next tokens, each row with its own request's settings.

Greedy rows take the argmax. Sampled rows apply temperature, top-k and top-p, then draw with the
exponential race (argmax of p / E, E ~ Exp(1)), which equals sampling from p. A seeded request
draws its noise from its own generator, so its tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

import torch

from worker.engine.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    # logits: [num_seqs, vocab] float32, row i for seqs[i]
    tokens = logits.argmax(dim=-1)  # [num_seqs]
    sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if sampled:
        rows = torch.tensor(sampled, device=logits.device)
        probs = _probabilities(logits[rows], [seqs[i].params for i in sampled])
        noise = torch.empty_like(probs)
        for j, i in enumerate(sampled):
            noise[j].exponential_(generator=seqs[i].generator)
        tokens[rows] = (probs / noise).argmax(dim=-1)
    return tokens.tolist()


def _probabilities(logits: torch.Tensor, params) -> torch.Tensor:
    # logits: [n, vocab] -> probs [n, vocab] after temperature, top-k, top-p
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)
    logits = logits / temperature
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        logits = _mask_top_k_top_p(logits, top_k, top_p)
    return torch.softmax(logits, dim=-1)


def _mask_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [n, vocab]
    k = torch.tensor([kk if 0 < kk < vocab else vocab for kk in top_k], device=logits.device).unsqueeze(1)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)  # [1, vocab]
    drop = ranks >= k
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # Drop a token when the tokens ranked above it already reach top_p (the best token always stays).
    mass_before = probs.cumsum(dim=-1) - probs
    p = torch.tensor(top_p, device=logits.device).unsqueeze(1)
    drop |= mass_before >= p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
