"""From a validated OpenAI body to a queued-ready `GenerationRequest`: resolve the model, apply the
chat template, tokenize, check the context length. Shared by the real-time routes and batch jobs,
so a line of a batch file is judged exactly like the same body sent live. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from hotswap.openai_schemas import ChatCompletionRequest, CompletionRequest, to_sampling
from hotswap.prompts import bad_token_id
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


def _check_chars(chars: int, param: str, tokenizer, max_model_len: int) -> None:
    """Refuse a prompt that cannot fit the context before tokenizing it, by its character count:
    tokenizing costs time in proportion to the text, refusing this way does not."""
    most = max_model_len * tokenizer.max_token_chars
    if chars > most:
        raise PrepareError(400, f"This model's maximum context length is {max_model_len} tokens, at most {most:,} "
                                f"characters of text; your prompt has {chars:,}. Shorten the prompt.", param=param,
                           code="context_length_exceeded")


def prompt_token_lists(body: ChatCompletionRequest | CompletionRequest, tokenizer,
                       max_model_len: int) -> list[tuple[str, list[int]]]:
    """(param, token ids) of each prompt: a chat body has one, a completions body one per prompt
    it holds. Token ids a client sent are used as they are (no re-tokenizing, no BOS added)."""
    if isinstance(body, ChatCompletionRequest):
        _check_chars(sum(len(m.text) for m in body.messages), "messages", tokenizer, max_model_len)
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        try:
            return [("messages", tokenizer.encode_chat(messages))]
        except (ValueError, TypeError, UnicodeError) as exc:  # no template, a refusal, untokenizable text
            raise PrepareError(400, f"messages: {exc}", param="messages") from None
    bad = bad_token_id(body.prompt, tokenizer.vocab_size)
    if bad is not None:
        raise PrepareError(400, bad.message, param=bad.param)
    prompts = body.prompts
    out = []
    for i, prompt in enumerate(prompts):
        param = f"prompt.{i}" if len(prompts) > 1 else "prompt"
        if isinstance(prompt, list):
            out.append((param, prompt))
            continue
        _check_chars(len(prompt), param, tokenizer, max_model_len)
        try:
            out.append((param, tokenizer.encode(prompt)))
        except (TypeError, UnicodeError) as exc:  # text the schema let through but the tokenizer cannot take
            raise PrepareError(400, f"{param}: cannot be tokenized ({exc})", param=param) from None
    return out


def _spec(body: ChatCompletionRequest | CompletionRequest, sampling: dict, tokens: list[int], param: str,
          max_model_len: int) -> SamplingSpec:
    """The sampling of one prompt: its token limit checked against the room its prompt leaves."""
    if not tokens:
        raise PrepareError(400, f"{param}: the prompt is empty", param=param)
    which = f" ({param})" if "." in param else ""  # which of several prompts
    room = max_model_len - len(tokens)
    if room < 1:
        raise PrepareError(400, f"This model's maximum context length is {max_model_len} tokens; your prompt"
                                f"{which} has {len(tokens)}. Shorten the prompt.", param=param,
                           code="context_length_exceeded")
    max_tokens = sampling["max_tokens"]
    if max_tokens is None:
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if isinstance(body, CompletionRequest) else room
    if len(tokens) + max_tokens > max_model_len:
        raise PrepareError(400, f"This model's maximum context length is {max_model_len} tokens; you asked for "
                                f"{len(tokens)} prompt{which} + {max_tokens} completion tokens. Lower max_tokens to "
                                f"at most {room} or shorten the prompt.", param="max_tokens",
                           code="context_length_exceeded")
    if sampling["min_tokens"] > max_tokens:
        raise PrepareError(400, f"min_tokens: must not exceed max_tokens ({max_tokens}), got {sampling['min_tokens']}",
                           param="min_tokens")
    return SamplingSpec(**{**sampling, "max_tokens": max_tokens})


def build_requests(body: ChatCompletionRequest | CompletionRequest, tenant: str, served: ServedModel, registry, *,
                   priority: Priority = "realtime", batch_id: str | None = None,
                   custom_id: str | None = None) -> list[GenerationRequest]:
    """One request per prompt of `body`, in order (`n` is the caller's: see api/fanout.py)."""
    target = resolve_target(body.model, tenant, served.base_model, registry)
    sampling = to_sampling(body)
    bad = bad_token_id(sampling["stop_token_ids"], served.tokenizer.vocab_size, "stop_token_ids")
    if bad is not None:
        raise PrepareError(400, bad.message, param=bad.param)
    prompts = prompt_token_lists(body, served.tokenizer, served.max_model_len)
    specs = [_spec(body, sampling, tokens, param, served.max_model_len) for param, tokens in prompts]
    return [GenerationRequest(tenant=tenant, base_model=served.base_model, model=body.model, target=target,
                              prompt_token_ids=tokens, sampling=spec, priority=priority, stream=bool(body.stream),
                              batch_id=batch_id, custom_id=custom_id, echo=bool(getattr(body, "echo", False)))
            for (_, tokens), spec in zip(prompts, specs)]


def build_request(body: ChatCompletionRequest | CompletionRequest, tenant: str, served: ServedModel, registry, *,
                  priority: Priority = "realtime", batch_id: str | None = None,
                  custom_id: str | None = None) -> GenerationRequest:
    """Exactly one request (a batch job's line): several prompts or n > 1 are refused."""
    if body.choices_per_prompt > 1:
        raise PrepareError(400, "n: a batch request line answers with one choice; send n=1 (one line per sample)",
                           param="n", code="unsupported_parameter")
    if isinstance(body, CompletionRequest) and len(body.prompts) > 1:
        raise PrepareError(400, f"prompt: a batch request line holds one prompt, got {len(body.prompts)}; send one "
                                "line per prompt", param="prompt", code="unsupported_parameter")
    return build_requests(body, tenant, served, registry, priority=priority, batch_id=batch_id,
                          custom_id=custom_id)[0]
