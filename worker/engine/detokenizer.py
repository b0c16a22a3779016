"""Incremental detokenizing with stop strings, for streaming text as tokens arrive.

Decodes a short window of recent tokens rather than the whole output each step (vLLM's offsets
trick), holds back text that could be the start of a stop string, and never emits half a UTF-8
character (a trailing U+FFFD means the next token completes it).
"""

from __future__ import annotations

from hotswap.tokenizer import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # all decoded text so far (stop string removed once found)
        self.emitted = 0  # characters of `text` already returned to the caller
        self.stop_from = 0  # text before this came while min_tokens held stop strings off

    def add(self, token_id: int, check_stop: bool = True) -> tuple[str, bool]:
        """Feed one token; returns (new text safe to emit, whether a stop string was hit). With
        check_stop False (min_tokens not reached yet) stop strings are not looked for; text is
        still held back, so a stop string that ends after that text is found then (as in vLLM)."""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if self.stop and not check_stop:
            self.stop_from = len(self.text)
        elif self.stop:
            hits = [i for i in (self.text.find(s, self._search_from(s)) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                return self.flush(), True
        safe_end = max(self.emitted, len(self.text) - self.holdback)
        delta = self.text[self.emitted : safe_end]
        self.emitted = safe_end
        return delta, False

    def _search_from(self, stop: str) -> int:
        # Only the new tail (plus a stop string's length) can contain a fresh match.
        start = max(0, self.emitted - self.holdback)
        if self.stop_from:  # after min_tokens: never cut emitted text, nor match one that ended before
            start = max(start, self.emitted, self.stop_from - len(stop) + 1)
        return start

    def flush(self) -> str:
        """Everything not yet emitted (call when the sequence finishes)."""
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta
