"""From a validated OpenAI body to a queued-ready `GenerationRequest`: resolve the model, apply the
chat template, tokenize, check the context length. Shared by the real-time routes and batch jobs,
so a line of a batch file is judged exactly like the same body sent live. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from hotswap.openai_schemas import ChatCompletionRequest, CompletionRequest, to_sampling
from hotswap.protocol import GenerationRequest, ModelTarget, Priority, SamplingSpec

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy completions default (vLLM does the same)


class PrepareError(Exception):
    """The body cannot be served as asked: `status` is the HTTP status to answer."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass(frozen=True)
class ServedModel:
    base_model: str
    tokenizer: object  # hotswap.tokenizer.Tokenizer
    max_model_len: int


def resolve_target(model: str, tenant: str, base_model: str, registry) -> ModelTarget:
    """`model` as the client wrote it -> what to run. The tenant only ever sees its own models."""
    if model == base_model:
        return ModelTarget(kind="base")
    from adapters.registry import NotFound

    try:
        record = registry.resolve(tenant, model)
    except (NotFound, ValueError):
        raise PrepareError(404, f"The model '{model}' does not exist or you do not have access to it. "
                                f"GET /v1/models lists yours.", param="model", code="model_not_found") from None
    if record.base_model != base_model:
        raise PrepareError(404, f"model '{model}' is a fine-tune of {record.base_model!r}, which this server does not "
                                f"serve (it serves {base_model!r})", param="model", code="model_not_found")
    return ModelTarget(kind=record.kind, ref=f"{tenant}/{record.ref}", digest=record.digest)


def check_prompt_chars(body: ChatCompletionRequest | CompletionRequest, tokenizer, max_model_len: int) -> None:
    """Refuse a prompt that cannot fit the context before tokenizing it, by its character count:
    tokenizing costs time in proportion to the text, refusing this way does not."""
    if isinstance(body, ChatCompletionRequest):
        chars, param = sum(len(m.text) for m in body.messages), "messages"
    elif isinstance(body.prompt, str):
        chars, param = len(body.prompt), "prompt"
    else:
        return  # token ids: counted exactly below
    most = max_model_len * tokenizer.max_token_chars
    if chars > most:
        raise PrepareError(400, f"This model's maximum context length is {max_model_len} tokens, at most {most:,} "
                                f"characters of text; your prompt has {chars:,}. Shorten the prompt.", param=param,
                           code="context_length_exceeded")


def prompt_tokens(body: ChatCompletionRequest | CompletionRequest, tokenizer) -> list[int]:
    if isinstance(body, ChatCompletionRequest):
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        try:
            return tokenizer.encode_chat(messages)
        except (ValueError, TypeError, UnicodeError) as exc:  # no template, a refusal, untokenizable text
            raise PrepareError(400, f"messages: {exc}", param="messages") from None
    if isinstance(body.prompt, list):
        if any(t >= tokenizer.vocab_size for t in body.prompt):
            raise PrepareError(400, f"prompt: token ids must be below the vocabulary size {tokenizer.vocab_size}",
                               param="prompt")
        return list(body.prompt)
    try:
        return tokenizer.encode(body.prompt)
    except (TypeError, UnicodeError) as exc:  # text the schema let through but the tokenizer cannot take
        raise PrepareError(400, f"prompt: cannot be tokenized ({exc})", param="prompt") from None


def build_request(body: ChatCompletionRequest | CompletionRequest, tenant: str, served: ServedModel, registry, *,
                  priority: Priority = "realtime", batch_id: str | None = None,
                  custom_id: str | None = None) -> GenerationRequest:
    target = resolve_target(body.model, tenant, served.base_model, registry)
    check_prompt_chars(body, served.tokenizer, served.max_model_len)
    tokens = prompt_tokens(body, served.tokenizer)
    if not tokens:
        raise PrepareError(400, "the prompt is empty", param="prompt")
    sampling = to_sampling(body)
    room = served.max_model_len - len(tokens)
    if room < 1:
        raise PrepareError(400, f"This model's maximum context length is {served.max_model_len} tokens; your prompt "
                                f"has {len(tokens)}. Shorten the prompt.", param="messages", code="context_length_exceeded")
    max_tokens = sampling["max_tokens"]
    if max_tokens is None:
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if isinstance(body, CompletionRequest) else room
    if len(tokens) + max_tokens > served.max_model_len:
        raise PrepareError(400, f"This model's maximum context length is {served.max_model_len} tokens; you asked for "
                                f"{len(tokens)} prompt + {max_tokens} completion tokens. Lower max_tokens to at most "
                                f"{room} or shorten the prompt.", param="max_tokens", code="context_length_exceeded")
    spec = SamplingSpec(max_tokens=max_tokens, temperature=sampling["temperature"], top_p=sampling["top_p"],
                        seed=sampling["seed"], stop=sampling["stop"])
    return GenerationRequest(tenant=tenant, base_model=served.base_model, model=body.model, target=target,
                             prompt_token_ids=tokens, sampling=spec, priority=priority, stream=bool(body.stream),
                             batch_id=batch_id, custom_id=custom_id)
