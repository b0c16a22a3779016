"""One streamed request to an OpenAI-compatible server, timed as vLLM's benchmark times it.

`send_one` streams `/v1/completions` or `/v1/chat/completions` with `stream_options.include_usage`
and fills a RequestRecord: TTFT = send -> first chunk carrying text (a chat stream's role-only first
chunk does not count), ITL = gaps between text-carrying chunks, E2EL = send -> end of the stream, the
server's usage, and the HTTP status or error of a failure (it never raises for one)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field


@dataclass
class RequestRecord:
    model: str
    prompt_len: int                  # client-side count; the server's is prompt_tokens
    max_tokens: int
    send_s: float = 0.0              # when sent, from the point's start
    success: bool = False
    status: int = 0                  # HTTP status (0: no answer)
    error: str = ""
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    e2el: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    chunks: int = 0
    response_id: str = ""
    text: str = ""
    usage_reported: bool = False


def endpoint_url(base_url: str, chat: bool) -> str:
    return base_url.rstrip("/") + ("/v1/chat/completions" if chat else "/v1/completions")


def auth_headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def request_body(model: str, prompt: str, max_tokens: int, chat: bool, temperature: float, extra: dict) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "temperature": temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    body.update(extra)
    return body


async def send_one(client, url: str, headers: dict, body: dict, record: RequestRecord, chat: bool,
                   tokenizer=None) -> RequestRecord:
    """Stream one request; fills `record` (never raises for a server or transport failure)."""
    import httpx

    start = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            record.status = resp.status_code
            if resp.status_code != 200:
                raw = (await resp.aread()).decode(errors="replace")
                try:
                    record.error = json.loads(raw)["error"]["message"][:200]
                except (ValueError, KeyError, TypeError):
                    record.error = raw[:200]
                return record
            done = False
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                now = time.perf_counter()
                obj = json.loads(data)
                if "error" in obj and not obj.get("choices"):
                    err = obj["error"]
                    record.error = f"stream error: {err.get('code')}: {str(err.get('message'))[:160]}"
                    return record
                if obj.get("usage"):
                    record.usage_reported = True
                    record.output_tokens = int(obj["usage"].get("completion_tokens") or 0)
                    record.prompt_tokens = obj["usage"].get("prompt_tokens")
                record.response_id = record.response_id or obj.get("id", "")
                for choice in obj.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if choice.get("finish_reason"):
                        record.finish_reason = choice["finish_reason"]
                    if text:
                        if not record.chunks:
                            record.ttft = now - start
                        else:
                            record.itl.append(now - last)
                        last = now
                        record.chunks += 1
                        record.text += text
            record.e2el = time.perf_counter() - start
            if not done and record.finish_reason is None:
                record.error = "stream ended without [DONE]"
                return record
    except (httpx.HTTPError, OSError) as exc:
        record.error = f"transport: {type(exc).__name__}: {exc}"[:200]
        return record
    if not record.usage_reported and tokenizer is not None:  # vLLM's fallback: count the text
        record.output_tokens = len(tokenizer.encode(record.text, add_special_tokens=False))
    record.success = record.chunks > 0 or record.output_tokens == 0
    if not record.success:
        record.error = "no text received"
    return record




def http_client(timeout: float):
    """An httpx.AsyncClient for many concurrent streams: no connection cap, `timeout` s per read."""
    import httpx

    return httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30),
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))
