"""The server-sent chunks of one streamed call, choice by choice (api/generation.py sends them).

Per choice: chat opens with a role chunk; then one chunk per delta with text; a completions choice
with echo starts with the prompt's text (and, with logprobs, the prompt's logprobs); the last chunk
carries the finish reason. With logprobs, each chunk carries the entries of the tokens that arrived
with it. A token whose text the worker still holds back (an incomplete character, a possible stop
string) has its entry wait for the next chunk with text, or the last chunk: so every token's entry
is sent exactly once, in order, and the entries of all chunks add up to the non-streamed answer's.
"""

from __future__ import annotations

from hotswap import openai_schemas as oa
from hotswap.openai_logprobs import chat_logprobs, completion_logprobs, prompt_positions, prompt_text
from hotswap.protocol import GenerationRequest, GenerationResult, LogprobEntry
from scheduler.aio import Delta


class ChunkMaker:
    def __init__(self, kind: str, reqs: list[GenerationRequest], response_id: str, include_usage: bool, tokenizer):
        self.kind, self.reqs, self.id, self.include_usage = kind, reqs, response_id, include_usage
        self.tokenizer = tokenizer
        self.model, self.created = reqs[0].model, int(reqs[0].created_at)
        n = len(reqs)
        self._pending: list[list[LogprobEntry]] = [[] for _ in range(n)]  # entries waiting for their text
        self._offset = [0] * n  # legacy text_offset: characters of the token strings sent so far
        self._started = [False] * n  # the echo (completions) is out

    def opening(self) -> list[dict]:
        if self.kind != "chat":
            return []
        return [self._chunk(i, role=True) for i in range(len(self.reqs))]

    def delta(self, index: int, delta: Delta) -> list[dict]:
        chunks = self._start(index, delta.prompt_logprobs)
        if delta.logprobs:
            self._pending[index] += delta.logprobs
        if delta.text:
            chunks.append(self._chunk(index, delta.text, logprobs=self._take(index)))
        return chunks

    def finish(self, index: int, result: GenerationResult) -> list[dict]:
        chunks = self._start(index, result.prompt_logprobs)
        finish = "length" if result.finish_reason == "length" else "stop"
        chunks.append(self._chunk(index, finish=finish, logprobs=self._take(index)))
        return chunks

    def _asked(self, index: int) -> bool:
        return self.reqs[index].sampling.logprobs is not None

    def _start(self, index: int, prompt_logprobs: list[LogprobEntry | None] | None) -> list[dict]:
        """The echoed prompt, before the choice's first output (completions with echo)."""
        req = self.reqs[index]
        if self._started[index] or self.kind == "chat" or not req.echo:
            return []
        self._started[index] = True
        logprobs = None
        if self._asked(index):
            logprobs = self._legacy(index, prompt_positions(req, prompt_logprobs))
        return [self._chunk(index, prompt_text(req, self.tokenizer), logprobs=logprobs)]

    def _take(self, index: int) -> dict | None:
        """The logprobs object of the pending entries (None when there are none, or none were asked for)."""
        if not self._asked(index) or not self._pending[index]:
            return None
        entries, self._pending[index] = self._pending[index], []
        if self.kind == "chat":
            return chat_logprobs(entries, self.tokenizer)
        return self._legacy(index, [(e[0], e) for e in entries])

    def _legacy(self, index: int, positions: list[tuple[int, LogprobEntry | None]]) -> dict:
        body = completion_logprobs(positions, self.tokenizer, self._offset[index])
        self._offset[index] += sum(len(t) for t in body["tokens"])
        return body

    def _chunk(self, index: int, text: str | None = None, finish: str | None = None, role: bool = False,
               logprobs: dict | None = None) -> dict:
        if self.kind == "chat":
            return oa.chat_chunk(self.id, self.model, self.created, delta_text=text,
                                 role="assistant" if role else None, finish_reason=finish,
                                 include_usage=self.include_usage, index=index, logprobs=logprobs)
        return oa.completion_chunk(self.id, self.model, self.created, text=text or "", finish_reason=finish,
                                   include_usage=self.include_usage, index=index, logprobs=logprobs)
