"""The `prompt` of /v1/completions in every shape OpenAI accepts, as a list of single prompts.

OpenAI's contract: a string, a list of strings, a list of token ids, or a list of lists of token
ids. A flat list of ids is one prompt; a list of strings or of id lists holds several, each
answered as its own choice. Token ids are used exactly as sent (never re-tokenized, no BOS added):
evaluation harnesses (lm-evaluation-harness sends `[[ids, ...]]`) score exactly the tokens they chose.

Pure and torch-free. The request schema checks the shape (`split_prompts`); the vocabulary is
checked where the tokenizer is known (`bad_token_id`), the per-request limits where the settings
are (`check_counts`). Every refusal is a `PromptError` naming the offending index ("prompt.2.7").

    split_prompts([[1, 2], [3]])  # -> [[1, 2], [3]]
    split_prompts("hi")           # -> ["hi"]
"""

from __future__ import annotations

from typing import Any

Prompt = str | list[int]

_SHAPES = "a string, a list of strings, a list of token ids or a list of lists of token ids"


class PromptError(ValueError):
    """A prompt (or fan-out) the request cannot have: `param` names where, `message` says why."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param, self.message = param, f"{param}: {message}"


def _show(value: Any) -> str:
    """A short repr of client data for a message (it may be a huge nested list)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_id(value: Any) -> bool:
    return type(value) is int  # strict: true is not 1, 1.0 is not an id


def _check_ids(ids: list, param: str) -> list[int]:
    for j, value in enumerate(ids):
        if not _is_id(value) or value < 0:
            raise PromptError(f"{param}.{j}", f"token ids are integers >= 0, got {_show(value)}")
    return list(ids)


def split_prompts(value: Any) -> list[Prompt]:
    """The prompts `value` holds, in order; PromptError for any other shape (never another exception)."""
    if isinstance(value, str):  # "" is refused once tokenized (as is any text that encodes to nothing)
        return [value]
    if not isinstance(value, list):
        raise PromptError("prompt", f"must be {_SHAPES}, got {type(value).__name__}")
    if not value:
        raise PromptError("prompt", "must not be an empty list")
    first = value[0]
    if _is_id(first):
        return [_check_ids(value, "prompt")]
    if isinstance(first, str):
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise PromptError(f"prompt.{i}", f"a list of prompts holds one kind; prompt.0 is a string, this is "
                                                 f"{_show(item)}")
        return list(value)
    if isinstance(first, list):
        prompts: list[Prompt] = []
        for i, item in enumerate(value):
            if not isinstance(item, list):
                raise PromptError(f"prompt.{i}", f"a list of prompts holds one kind; prompt.0 is a list of token "
                                                 f"ids, this is {_show(item)}")
            if not item:
                raise PromptError(f"prompt.{i}", "must not be an empty list")
            prompts.append(_check_ids(item, f"prompt.{i}"))
        return prompts
    raise PromptError("prompt.0", f"prompt must be {_SHAPES}; its first item is {_show(first)}")


def is_nested(value: Any) -> bool:
    """Whether `value` (a valid prompt) is a list of prompts rather than one prompt: it decides how an
    index is named ("prompt.1.4" in a list of id lists, "prompt.4" in one id list)."""
    return isinstance(value, list) and bool(value) and not _is_id(value[0])


def bad_token_id(value: Any, vocab_size: int, param: str = "prompt") -> PromptError | None:
    """The first token id of a valid prompt (or of any list of ids) outside [0, vocab_size), as an error."""
    groups = [(f"{param}.{i}", ids) for i, ids in enumerate(value)] if is_nested(value) else [(param, value)]
    for name, ids in groups:
        if isinstance(ids, str):
            continue
        for j, token in enumerate(ids):
            if not 0 <= token < vocab_size:
                return PromptError(f"{name}.{j}", f"token id {token} is not in the vocabulary [0, {vocab_size})")
    return None


def check_counts(num_prompts: int, n: int, *, max_prompts: int, max_n: int) -> None:
    """The fan-out limits of one real-time call: prompts per request and choices per prompt."""
    if num_prompts > max_prompts:
        raise PromptError("prompt", f"at most {max_prompts} prompts per request on this server "
                                    f"(HOTSWAP_MAX_PROMPTS_PER_REQUEST), got {num_prompts}; send several requests, "
                                    f"or use the Batch API")
    if n > max_n:
        raise PromptError("n", f"at most {max_n} choices per prompt on this server (HOTSWAP_MAX_N), got {n}")
