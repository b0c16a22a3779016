"""Turns one step's logits into next tokens, each row with its own request's settings.

Order, per row:
1. logprobs (if asked) from the raw logits: log_softmax in float32 of what the step produced
   (after the LoRA adapter), before anything below; see logprobs.py.
2. penalties (repetition, frequency, presence) and min_tokens (EOS and stop tokens to -inf) change
   the logits used for choosing; see penalties.py. Only rows that use them are touched.
3. Greedy rows take the argmax. Sampled rows apply temperature, top-k and top-p, then draw with the
   exponential race (argmax of p / E, E ~ Exp(1)), which equals sampling from p. A seeded request
   draws its noise from its own generator, so its tokens do not depend on what else is in the batch.
A step where nobody asks for logprobs, penalties or min_tokens pays two list scans for them.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

from worker.engine.logprobs import TokenLogprob, entries, log_probs
from worker.engine.penalties import ban_tokens_, penalize_
from worker.engine.sequence import Sequence


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[TokenLogprob | None]  # one per row; None where the request did not ask


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: Collection[int] = ()) -> list[int]:
    return sample_step(logits, seqs, eos_token_ids).token_ids


def sample_step(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: Collection[int] = ()) -> SamplerOutput:
    # logits: [num_seqs, vocab] float32, row i for seqs[i]; not modified
    want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    raw = log_probs(logits[want]) if want else None  # [len(want), vocab], before any adjustment
    adjusted = adjust_logits(logits, seqs, eos_token_ids)
    tokens = _choose(adjusted, seqs)  # [num_seqs]
    logprobs: list[TokenLogprob | None] = [None] * len(seqs)
    if want:
        rows = torch.tensor(want, device=logits.device)
        for i, entry in zip(want, entries(raw, tokens[rows], [seqs[i].params.logprobs for i in want])):
            logprobs[i] = entry
    return SamplerOutput(tokens.tolist(), logprobs)


def adjust_logits(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: Collection[int]) -> torch.Tensor:
    """Penalties and min_tokens on the rows that use them, in a copy; the input stays raw. Returns
    the input itself when no row uses them."""
    rows = [i for i, s in enumerate(seqs)
            if s.params.has_penalties or len(s.output_token_ids) < s.params.min_tokens]
    if not rows:
        return logits
    adjusted = logits.clone()  # [num_seqs, vocab]
    pen = [i for i in rows if seqs[i].params.has_penalties]
    if pen:
        ps = [seqs[i].params for i in pen]
        penalize_(adjusted, pen, [seqs[i].prompt_token_ids for i in pen], [seqs[i].output_token_ids for i in pen],
                  [p.presence_penalty for p in ps], [p.frequency_penalty for p in ps],
                  [p.repetition_penalty for p in ps])
    return ban_tokens_(adjusted, rows, [_banned(seqs[i], eos_token_ids) for i in rows])


def _banned(seq: Sequence, eos_token_ids: Collection[int]) -> list[int]:
    """The tokens min_tokens forbids for this row now: stop tokens, and EOS unless it is ignored."""
    if len(seq.output_token_ids) >= seq.params.min_tokens:
        return []
    stops = list(seq.params.stop_token_ids)
    return stops if seq.params.ignore_eos else stops + [t for t in eos_token_ids if t not in stops]


def _choose(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    # logits: [num_seqs, vocab] -> token ids [num_seqs] int64
    tokens = logits.argmax(dim=-1)  # [num_seqs]
    sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if sampled:
        rows = torch.tensor(sampled, device=logits.device)
        probs = _probabilities(logits[rows], [seqs[i].params for i in sampled])
        noise = torch.empty_like(probs)
        for j, i in enumerate(sampled):
            noise[j].exponential_(generator=seqs[i].generator)
        tokens[rows] = (probs / noise).argmax(dim=-1)
    return tokens


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
