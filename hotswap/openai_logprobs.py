"""Log-probabilities in OpenAI's two response shapes, and one choice's answer, from what workers report.

Workers report token ids and floats (`hotswap.protocol.LogprobEntry`: log_softmax of the raw logits,
before penalties, temperature, top-k/top-p, as vLLM reports by default); the token strings are made
here, where the tokenizer is, by decoding each id alone (`Tokenizer.token_text`, as vLLM does).

- chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}],
  "refusal": None}`; `top_logprobs` are the k most likely tokens, best first (the chosen one is in it
  only when it is one of them). `bytes`: the UTF-8 bytes of the token string (so a token holding part
  of a multi-byte character, whose string is U+FFFD, gives that character's bytes, as vLLM does).
- completions (legacy): `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`. Each
  `top_logprobs` entry maps token strings to logprobs for the chosen token and the k most likely
  ("up to logprobs + 1 elements", as OpenAI documents), built in the order [chosen, best, ..., k-th]:
  when two ids decode to one string, the later one wins (vLLM's behaviour), so a dict can hold fewer
  entries. The chosen token's own value is the very float in `token_logprobs`, and so is its entry
  when it is among the k best. `text_offset`: where each token's string starts in the choice's
  text, adding up the token strings' lengths (as vLLM; exact when each token decodes on its own).
  With echo the prompt's tokens come first, the first of them with `null` logprob and top_logprobs.

Used by the live routes (api/) and the batch output (scheduler/batchjobs/output.py) alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from hotswap.protocol import GenerationRequest, GenerationResult, LogprobEntry


class MissingLogprobs(Exception):
    """The request asked for logprobs and its result carries none: a worker older than this API ran it."""


def _chat_token(tokenizer, token_id: int, logprob: float) -> dict:
    text = tokenizer.token_text(token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(entries: list[LogprobEntry], tokenizer) -> dict:
    """A chat choice's (or a chunk's) `logprobs` object for these generated tokens."""
    content = []
    for token_id, logprob, top in entries:
        item = _chat_token(tokenizer, token_id, logprob)
        item["top_logprobs"] = [_chat_token(tokenizer, t, v) for t, v in top]
        content.append(item)
    return {"content": content, "refusal": None}


def completion_logprobs(tokens: list[tuple[int, LogprobEntry | None]], tokenizer, text_offset: int = 0) -> dict:
    """The legacy `logprobs` object: one position per (token id, its entry); an entry of None (the
    first prompt token's) gives null logprob and top_logprobs. `text_offset`: where the first token
    starts in the choice's text (a stream's later chunks continue from their predecessors)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, entry in tokens:
        text = tokenizer.token_text(token_id)
        out["tokens"].append(text)
        out["text_offset"].append(text_offset)
        text_offset += len(text)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        _, logprob, top = entry
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append({tokenizer.token_text(t): v for t, v in [(token_id, logprob), *top]})
    return out


def needs_tokenizer(req: GenerationRequest) -> bool:
    """Whether answering the request needs the tokenizer (to name tokens, or to echo the prompt)."""
    return req.echo or req.sampling.logprobs is not None


def prompt_text(req: GenerationRequest, tokenizer) -> str:
    """What echo puts before the completion: the prompt's tokens decoded (special tokens kept), so
    a prompt sent as token ids echoes as text, and the text lines up with the prompt's logprobs."""
    return tokenizer.decode(req.prompt_token_ids, skip_special_tokens=False)


def prompt_positions(req: GenerationRequest,
                     prompt_logprobs: list[LogprobEntry | None] | None) -> list[tuple[int, LogprobEntry | None]]:
    """(token id, entry) of every prompt token, for echo with logprobs."""
    if prompt_logprobs is None or len(prompt_logprobs) != len(req.prompt_token_ids):
        raise MissingLogprobs(f"request {req.id} asked for the prompt's logprobs and its result has none")
    return list(zip(req.prompt_token_ids, prompt_logprobs))


def generated(req: GenerationRequest, result: GenerationResult) -> list[LogprobEntry]:
    """The generated tokens' entries, one per token."""
    if result.logprobs is None or len(result.logprobs) != len(result.token_ids):
        raise MissingLogprobs(f"request {req.id} asked for logprobs and its result has none for its tokens")
    return result.logprobs


@dataclass
class Answer:
    """One choice as the response shows it."""

    text: str
    finish_reason: str  # "stop" | "length"
    logprobs: dict | None  # the choice's `logprobs` object, None when not asked for


def answer(kind: str, req: GenerationRequest, result: GenerationResult, tokenizer) -> Answer:
    """A completed request's choice: its text (after the prompt, with echo) and logprobs in `kind`'s
    shape. MissingLogprobs when they were asked for and the result lacks them."""
    finish = "length" if result.finish_reason == "length" else "stop"
    asked = req.sampling.logprobs is not None
    if kind == "chat":
        return Answer(result.text, finish, chat_logprobs(generated(req, result), tokenizer) if asked else None)
    text = prompt_text(req, tokenizer) + result.text if req.echo else result.text
    if not asked:
        return Answer(text, finish, None)
    positions = prompt_positions(req, result.prompt_logprobs) if req.echo else []
    positions += [(entry[0], entry) for entry in generated(req, result)]
    return Answer(text, finish, completion_logprobs(positions, tokenizer))
