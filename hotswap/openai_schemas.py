"""The OpenAI request bodies we accept, and the response bodies we send, as OpenAI shapes them.

Shared by the real-time routes and by batch-file line validation, so a body that one accepts the
other accepts too. Validation is strict (no "5" for 5, no true for 1) and closed: a parameter we
do not implement is refused by name ("unsupported parameter(s): tools, logit_bias") rather than
silently ignored, because a client that asks for tool calls or best_of=3 and gets something else
back has a bug it cannot see. A few parameters are accepted when they ask for OpenAI's default
behaviour (best_of=1, tools=[], store=false, ...): clients and SDKs send those
routinely, and honouring them is a no-op. They are dropped on validation.

Log-probabilities: chat's `logprobs` / `top_logprobs` (0..20) and completions' `logprobs` (0..5) and
`echo` (max_tokens 0 with echo scores the prompt alone); hotswap/openai_logprobs.py shapes them.

Besides OpenAI's own, both requests take vLLM's documented extra sampling parameters
`repetition_penalty`, `min_tokens` and `stop_token_ids`.

    req = ChatCompletionRequest.model_validate(body)      # pydantic.ValidationError on a bad body
    param, message = error_message(exc)                    # one line naming the parameter
    to_sampling(req)  # {"max_tokens", "temperature", ..., "stop_token_ids"} with OpenAI's defaults

The builders (`chat_completion`, `chat_choices`, `chat_chunk`, `usage_chunk`, `completion`,
`completion_choices`, `completion_chunk`) return plain dicts that the official `openai` package
parses into its own types.
"""

from __future__ import annotations

import secrets
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from hotswap.prompts import Prompt, PromptError, split_prompts
from hotswap.structured import GuidedSpec

__all__ = [
    "ChatCompletionRequest", "ChatMessage", "CompletionRequest", "StreamOptions", "TextPart",
    "chat_choices", "chat_chunk", "chat_completion", "completion", "completion_choices", "completion_chunk",
    "error_message", "new_id",
    "to_sampling", "unsupported_params", "usage", "usage_chunk",
]

Kind = Literal["chat", "completion"]
FinishReason = Literal["stop", "length"]

# Parameters OpenAI defines that we accept only when they ask for the default behaviour, and then
# drop: name -> its harmless values (None, i.e. JSON null, is always harmless; () means only None).
_COMMON_IGNORED: dict[str, tuple[Any, ...]] = {"best_of": (1,), "logit_bias": ({},)}
_IGNORED: dict[str, dict[str, tuple[Any, ...]]] = {
    "chat": {**_COMMON_IGNORED,
             "tools": ([],), "functions": ([],),
             "tool_choice": ("none",), "function_call": ("none",), "parallel_tool_calls": (),
             "store": (False,), "metadata": ({},), "service_tier": ("auto", "default"),
             "modalities": (["text"],), "audio": (), "prediction": (), "reasoning_effort": (),
             "web_search_options": ()},
    "completion": {**_COMMON_IGNORED, "suffix": ("",)},
}
# What would work instead, appended to the message.
_HINTS = {
    "best_of": "best_of must be 1",
}


def _harmless(value: Any, allowed: tuple[Any, ...]) -> bool:
    if value is None:
        return True
    # Compare types too, or True would pass for 1 and False for 0 (True == 1 in Python).
    return any(value == a and (type(value) is type(a) or {type(value), type(a)} <= {int, float})
               for a in allowed)


def _model(kind: Kind) -> type[_Sampling]:
    return ChatCompletionRequest if kind == "chat" else CompletionRequest


def unsupported_params(body: dict, kind: Kind) -> list[str]:
    """Keys of `body` we refuse, in body order: unknown keys, and known ones asking for something
    we do not do (tools, n>1, a non-zero penalty, ...). Our own fields are left to validation."""
    fields, ignored = _model(kind).model_fields, _IGNORED[kind]
    return [key for key, value in body.items()
            if key not in fields and (key not in ignored or not _harmless(value, ignored[key]))]


def lone_surrogate(value: Any) -> tuple[str, str] | None:
    """(path, code point) of the first string, key or value, holding a lone UTF-16 surrogate.
    JSON can carry one ("\\ud800") and Python decodes it, but no UTF-8 text (the tokenizer, Redis,
    an output file) can hold it. Iterative: the body may nest deeply."""
    stack: list[tuple[str, Any]] = [("body", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                return path, f"\\u{ord(item[exc.start]):04x}"
        elif isinstance(item, dict):
            for key, child in item.items():
                name = f"{path}.{printable(key)}".removeprefix("body.")
                stack += [(name, key), (name, child)]
        elif isinstance(item, list):
            stack += [(f"{path}.{i}".removeprefix("body."), child) for i, child in enumerate(item)]
    return None


def refuse_lone_surrogates(body: Any) -> Any:
    """A before-validator for request bodies: an "invalid_unicode" error naming where the bad text is."""
    bad_text = lone_surrogate(body)
    if bad_text:
        raise PydanticCustomError("invalid_unicode", "{param}: contains a lone UTF-16 surrogate ({char}); send valid "
                                  "Unicode (surrogates only in complete pairs)", {"param": bad_text[0], "char": bad_text[1]})
    return body


def printable(text: Any) -> str:
    """str(text) with lone surrogates as visible escapes ("\\ud800"): UTF-8 cannot hold them."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def _refuse_unsupported(body: Any, kind: Kind) -> Any:
    """The before-validator of both requests: refuse broken text and unsupported parameters by name,
    then drop the harmless extras."""
    if not isinstance(body, dict):
        return body
    refuse_lone_surrogates(body)
    bad = unsupported_params(body, kind)
    if bad:
        hints = "; ".join(dict.fromkeys(_HINTS[k] for k in bad if k in _HINTS))
        raise PydanticCustomError("unsupported_parameter", "unsupported parameter(s): {names}{hint}",
                                  {"names": ", ".join(bad), "hint": f" ({hints})" if hints else ""})
    fields = _model(kind).model_fields
    return {k: v for k, v in body.items() if k in fields}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        if isinstance(value, list):
            # repr: a client may send any JSON as "type", hashable or not
            kinds = {repr(p.get("type")) for p in value if isinstance(p, dict)} - {"'text'"}
            if kinds:
                raise PydanticCustomError("unsupported_content", "only text content parts are supported, got "
                                          "{kinds}", {"kinds": ", ".join(sorted(kinds))})
        return value

    @property
    def text(self) -> str:
        """The content as one string (text parts joined by newlines)."""
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class _Sampling(_Strict):
    """What both endpoints share. None means "OpenAI's default" everywhere."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # what the workers' generators take
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # n > 1: each choice is its own generation request (api/fanout.py); the server's HOTSWAP_MAX_N caps it lower.
    n: int | None = Field(default=None, ge=1, le=128)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    # vLLM's extra sampling parameters, with vLLM's meaning.
    repetition_penalty: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    min_tokens: int | None = Field(default=None, ge=0)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    # Structured output: {"type": "text" | "json_object" | "json_schema", ...} (hotswap/structured.py);
    # completions take it too, as vLLM's do.
    response_format: dict[str, Any] | None = None

    @field_validator("response_format")
    @classmethod
    def _check_response_format(cls, value: dict | None) -> dict | None:
        try:
            GuidedSpec.from_response_format(value)
        except ValueError as exc:  # names the field and what to change
            raise PydanticCustomError("invalid_response_format", "{message}",
                                      {"param": "response_format", "message": str(exc)}) from None
        return value

    @property
    def guided(self) -> GuidedSpec | None:
        return GuidedSpec.from_response_format(self.response_format)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4:
            raise PydanticCustomError("too_many_stops", "at most 4 stop sequences, got {n}", {"n": len(stops)})
        if any(s == "" for s in stops):
            raise PydanticCustomError("empty_stop", "stop sequences must be non-empty strings")
        return value if stops else None

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError("stream_options", "stream_options is only allowed when stream is true")
        return self

    @model_validator(mode="after")
    def _min_tokens_within_limit(self):
        limit = getattr(self, "max_completion_tokens", None) or self.max_tokens
        if self.min_tokens is not None and limit is not None and self.min_tokens > limit:
            raise PydanticCustomError("min_tokens", "min_tokens: must not exceed the completion token limit ({limit}), "
                                      "got {min}", {"param": "min_tokens", "min": self.min_tokens, "limit": limit})
        return self

    @model_validator(mode="after")
    def _structured_output_decides_the_end(self):
        if self.min_tokens and self.response_format and self.response_format.get("type") != "text":
            raise PydanticCustomError("min_tokens", "min_tokens cannot be combined with a structured response_format: "
                                      "the JSON's grammar decides where the output ends", {"param": "min_tokens"})
        return self

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None  # each output token's logprob ...
    top_logprobs: int | None = Field(default=None, ge=0, le=20)  # ... and its k most likely alternatives

    @model_validator(mode="before")
    @classmethod
    def _supported(cls, body: Any) -> Any:
        return _refuse_unsupported(body, "chat")

    @model_validator(mode="after")
    def _one_token_limit(self):
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise PydanticCustomError("token_limits", "max_tokens and max_completion_tokens disagree; send only "
                                      "max_completion_tokens")
        return self

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:  # 0 (or null) alone asks for nothing: accepted, as before
            raise PydanticCustomError("top_logprobs", "top_logprobs: requires logprobs: true",
                                      {"param": "top_logprobs"})
        return self


class CompletionRequest(_Sampling):
    # The field's type documents the four shapes; the before-validator refuses every other one by index.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)  # 0 only with echo: the prompt scored, nothing generated
    logprobs: int | None = Field(default=None, ge=0, le=5)  # each token's logprob and its k most likely alternatives
    echo: bool | None = None  # the answer starts with the prompt (and its logprobs, with logprobs)

    @model_validator(mode="before")
    @classmethod
    def _supported(cls, body: Any) -> Any:
        return _refuse_unsupported(body, "completion")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        try:
            split_prompts(value)
        except PromptError as exc:
            raise PydanticCustomError("invalid_prompt", "{message}", {"param": exc.param, "message": exc.message})
        return value

    @model_validator(mode="after")
    def _zero_tokens_need_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise PydanticCustomError("max_tokens", "max_tokens: 0 is only allowed with echo: true (scoring the "
                                      "prompt); ask for at least 1 token", {"param": "max_tokens"})
        return self

    @property
    def prompts(self) -> list[Prompt]:
        """The prompts, one per group of choices (see `hotswap.prompts`)."""
        return split_prompts(self.prompt)


def to_sampling(req: ChatCompletionRequest | CompletionRequest) -> dict:
    """The engine's view: OpenAI's defaults filled in. max_tokens None = up to the context limit."""
    limit = getattr(req, "max_completion_tokens", None) or req.max_tokens
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return {"max_tokens": limit,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "seed": req.seed, "stop": stop,
            "presence_penalty": req.presence_penalty or 0.0,
            "frequency_penalty": req.frequency_penalty or 0.0,
            "repetition_penalty": 1.0 if req.repetition_penalty is None else req.repetition_penalty,
            "min_tokens": req.min_tokens or 0,
            "stop_token_ids": list(req.stop_token_ids or []),
            "guided": req.guided.as_dict() if req.guided else None,
            **_logprobs(req)}


def _logprobs(req: ChatCompletionRequest | CompletionRequest) -> dict:
    """SamplingSpec's logprobs (per generated token) and prompt_logprobs (echo): None = off, k = top k."""
    if isinstance(req, ChatCompletionRequest):
        return {"logprobs": (req.top_logprobs or 0) if req.logprobs else None, "prompt_logprobs": None}
    return {"logprobs": req.logprobs, "prompt_logprobs": req.logprobs if req.echo else None}


def error_message(exc: ValidationError) -> tuple[str | None, str]:
    """(param, one-line message) for the first error: what an API 400 or a batch error line says."""
    first = exc.errors()[0]
    if first["type"] == "unsupported_parameter":  # the message names them all; param is the first
        return first["ctx"]["names"].split(", ")[0], first["msg"]
    if "param" in first.get("ctx", {}):  # the error names a place its loc does not (deeper, or a model check)
        return first["ctx"]["param"], first["msg"]
    param = ".".join(str(p) for p in first["loc"]) or None
    return param, f"{param}: {first['msg']}" if param else first["msg"]


# ---------------------------------------------------------------------------------------------
# Responses


def new_id(kind: Kind) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; `cached_tokens`: prompt tokens whose KV came from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _envelope(id: str, obj: str, model: str, created: int | None, choices: list) -> dict:
    return {"id": id, "object": obj, "created": int(time.time()) if created is None else created,
            "model": model, "system_fingerprint": None, "choices": choices}


def _per_choice(logprobs: list[dict | None] | None, n: int) -> list[dict | None]:
    """Each choice's `logprobs` object (hotswap/openai_logprobs.py), None where not asked for."""
    if logprobs is not None and len(logprobs) != n:
        raise ValueError(f"{len(logprobs)} logprobs objects for {n} choices")
    return logprobs or [None] * n


def chat_choices(id: str, model: str, created: int | None, choices: list[tuple[str, FinishReason]],
                 prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
                 logprobs: list[dict | None] | None = None) -> dict:
    """A chat completion with one choice per (text, finish_reason), `index` = its position;
    `logprobs`: each choice's logprobs object, when asked for."""
    body = _envelope(id, "chat.completion", model, created,
                     [{"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                       "logprobs": lp, "finish_reason": finish}
                      for i, ((text, finish), lp) in enumerate(zip(choices, _per_choice(logprobs, len(choices))))])
    body["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens)
    return body


def chat_completion(id: str, model: str, created: int | None, text: str, finish_reason: FinishReason,
                    prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
                    logprobs: dict | None = None) -> dict:
    return chat_choices(id, model, created, [(text, finish_reason)], prompt_tokens, completion_tokens, cached_tokens,
                        [logprobs])


def chat_chunk(id: str, model: str, created: int | None, delta_text: str | None = None,
               role: str | None = None, finish_reason: FinishReason | None = None,
               include_usage: bool = False, index: int = 0, logprobs: dict | None = None) -> dict:
    """One streamed delta of choice `index` (with the logprobs of its tokens, when asked for). With
    include_usage, OpenAI sends "usage": null on every chunk but the last."""
    delta = {} if role is None else {"role": role}
    if delta_text is not None:
        delta["content"] = delta_text
    body = _envelope(id, "chat.completion.chunk", model, created,
                     [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}])
    if include_usage:
        body["usage"] = None
    return body


def usage_chunk(id: str, model: str, created: int | None, prompt_tokens: int, completion_tokens: int,
                kind: Kind = "chat", cached_tokens: int = 0) -> dict:
    """The last chunk of a stream with stream_options.include_usage: no choices, only usage."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    body = _envelope(id, obj, model, created, [])
    body["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens)
    return body


def completion_choices(id: str, model: str, created: int | None, choices: list[tuple[str, FinishReason]],
                       prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
                       logprobs: list[dict | None] | None = None) -> dict:
    """A text completion with one choice per (text, finish_reason), `index` = its position;
    `logprobs`: each choice's logprobs object, when asked for."""
    body = _envelope(id, "text_completion", model, created,
                     [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}
                      for i, ((text, finish), lp) in enumerate(zip(choices, _per_choice(logprobs, len(choices))))])
    body["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens)
    return body


def completion(id: str, model: str, created: int | None, text: str, finish_reason: FinishReason,
               prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
               logprobs: dict | None = None) -> dict:
    return completion_choices(id, model, created, [(text, finish_reason)], prompt_tokens, completion_tokens,
                              cached_tokens, [logprobs])


def completion_chunk(id: str, model: str, created: int | None, text: str = "",
                     finish_reason: FinishReason | None = None, include_usage: bool = False, index: int = 0,
                     logprobs: dict | None = None) -> dict:
    body = _envelope(id, "text_completion", model, created,
                     [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}])
    if include_usage:
        body["usage"] = None
    return body
