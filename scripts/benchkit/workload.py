"""The workload of a serving benchmark: request shapes, rates, Poisson/gamma arrivals, the model mix,
and prompts cut to an exact token length (as the server counts them) from a fixed English passage."""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass

import numpy as np

PASSAGE = (
    "The harbour town woke slowly that winter. Fishing boats came in before dawn with their lamps still lit, "
    "and the market opened as the first light touched the slate roofs. Traders argued about the price of salt, "
    "children ran between the stalls, and an old clockmaker repaired the tower clock that had stopped during "
    "the storm. In the library on the hill a young archivist sorted letters written by sailors two centuries "
    "ago: requests for news from home, lists of supplies, careful drawings of coastlines that no longer look "
    "the same. She copied each one into a ledger, noting the date, the ship and the weather, because the "
    "museum planned an exhibition for the spring. By noon the wind had turned, the gulls moved inland, and the "
    "ferry to the islands left half empty. Engineers from the city inspected the sea wall, measured the cracks "
    "with brass calipers, and wrote that it would hold for another decade if the winters stayed mild. "
    "Nobody believed them, but everyone was glad to hear it. In the evening the bakery sold the last loaves "
    "at half price, the tavern lit its fire, and a fiddler played songs about the northern passage."
).split()


@dataclass(frozen=True)
class Shape:
    input_len: int
    output_len: int

    @property
    def name(self) -> str:
        return f"{self.input_len}x{self.output_len}"


def parse_shape(text: str) -> Shape:
    try:
        a, b = text.lower().split("x")
        shape = Shape(int(a), int(b))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: use INPUTxOUTPUT tokens, e.g. 128x32") from None
    if shape.input_len < 1 or shape.output_len < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r}: lengths must be >= 1")
    return shape


def parse_rates(text: str) -> list[float]:
    rates = []
    for part in text.split(","):
        rate = math.inf if part.strip().lower() in ("inf", "infinity") else float(part)
        if not rate > 0:
            raise argparse.ArgumentTypeError(f"rates must be > 0 (or inf), got {part!r}")
        rates.append(rate)
    return rates


def parse_mix(spec: str, base_model: str) -> list[tuple[str, float]]:
    """"base,lora-0:2,lora-1" -> [(base_model, 1), ("lora-0", 2), ("lora-1", 1)]; "base" = base_model."""
    mix = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, _, weight = part.partition(":")
        w = float(weight) if weight else 1.0
        if w <= 0:
            raise ValueError(f"model weight must be > 0 in {part!r}")
        mix.append((base_model if name == "base" else name, w))
    if not mix:
        raise ValueError("--models names no model")
    return mix


def zipf_mix(names: list[str], s: float) -> list[tuple[str, float]]:
    """Weights 1 / rank**s in the order given (the first is the most popular)."""
    return [(n, 1.0 / (rank ** s)) for rank, n in enumerate(names, start=1)]


def assign_models(n: int, mix: list[tuple[str, float]], seed: int) -> list[str]:
    rng = random.Random(seed + 7)
    names, weights = zip(*mix)
    return rng.choices(names, weights=weights, k=n)


def arrival_offsets(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times (s from start) of n requests: gamma gaps of mean 1/rate (burstiness 1 = Poisson,
    as vLLM draws them); rate inf sends all at t=0."""
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    gaps[0] = 0.0
    return list(np.cumsum(gaps))


class PromptMaker:
    """Prompts of exact token lengths (as the server counts them) from PASSAGE."""

    def __init__(self, tokenizer, chat: bool = False):
        self.tok, self.chat = tokenizer, chat

    def count(self, text: str) -> int:
        if self.chat:
            return len(self.tok.encode_chat([{"role": "user", "content": text}]))
        return len(self.tok.encode(text))

    def make(self, n_tokens: int, index: int, seed: int) -> str:
        rng = random.Random(seed * 1_000_003 + index)
        start = rng.randrange(len(PASSAGE))
        words = PASSAGE[start:] + PASSAGE[:start]
        text = " ".join(words)
        ids = self.tok.encode(text, add_special_tokens=False)
        while len(ids) < n_tokens + 8:
            text = text + " " + " ".join(words)
            ids = self.tok.encode(text, add_special_tokens=False)
        best, cut = None, n_tokens
        for _ in range(12):  # decode(ids[:cut]) may re-encode to a slightly different length: adjust the cut
            candidate = self.tok.decode(ids[:max(1, cut)])
            got = self.count(candidate)
            if best is None or abs(got - n_tokens) < abs(best[1] - n_tokens):
                best = (candidate, got)
            if got == n_tokens:
                break
            cut += n_tokens - got
            if cut < 1:
                break
        return best[0]


@dataclass
class Workload:
    shape: Shape
    prompts: list[str]
    prompt_lens: list[int]
    models: list[str]


def make_workload(maker: PromptMaker, shape: Shape, n: int, mix: list[tuple[str, float]], seed: int) -> Workload:
    prompts = [maker.make(shape.input_len, i, seed) for i in range(n)]
    return Workload(shape, prompts, [maker.count(p) for p in prompts], assign_models(n, mix, seed))
