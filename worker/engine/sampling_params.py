"""Per-request generation settings, validated where they are made."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # top-k alternatives per position, as OpenAI's top_logprobs allows
PENALTY_RANGE = (-2.0, 2.0)  # OpenAI's range for presence_penalty and frequency_penalty


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    seed: int | None = None  # makes a sampled request reproducible, whatever else shares its batch
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the text)
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop tokens, besides EOS
    ignore_eos: bool = False  # benchmarks: generate exactly max_tokens
    return_logits: bool = False  # tests: hand back each step's logits for this request
    # Penalties (penalties.py). OpenAI: subtract presence_penalty once from every token that appeared
    # in the output so far, and frequency_penalty times its count there. vLLM/HF repetition_penalty:
    # over prompt and output tokens, a positive logit is divided by it, a negative one multiplied.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0  # EOS and stop_token_ids are impossible, stop strings ignored, until this many tokens
    # Log-probabilities (logprobs.py), of the raw logits: None = off; k = the chosen token's plus the top k.
    logprobs: int | None = None  # per generated token
    prompt_logprobs: int | None = None  # per prompt token given its prefix (the first one has none)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        lo, hi = PENALTY_RANGE
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not lo <= value <= hi:
                raise ValueError(f"{name} must be in [{lo:g}, {hi:g}], got {value}")
        if not self.repetition_penalty > 0:  # also refuses NaN
            raise ValueError(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}")
        if _not_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (_not_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be None (off) or an integer in [0, {MAX_LOGPROBS}] "
                                 f"(how many top alternatives to return), got {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


def _not_int(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)  # True is an int to Python, not a count
