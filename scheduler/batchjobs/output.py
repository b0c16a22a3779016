"""The lines of a batch job's output and error files, and writing those files.

A successful line carries the very body the live endpoint returns (built with the same
`hotswap.openai_schemas` builders and `hotswap.openai_logprobs.answer`, `model` = the name the line
used); a failed one the status and error envelope the live endpoint would have answered. See `scheduler/batchjobs/records.py` for what goes where.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator

from hotswap import keys
from hotswap import openai_schemas as oa
from hotswap.openai_logprobs import MissingLogprobs, answer
from hotswap.protocol import FAILURE_STATUS, GenerationRequest, GenerationResult
from scheduler.batchjobs.lines import error_body, new_line_id

# A worker's failure code -> the HTTP status the live endpoint answers (as api/generation.py does).
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."


def line_id(spec: GenerationRequest) -> str:
    return "batch_req_" + spec.id.removeprefix("req_")


def success_line(spec: GenerationRequest, result: GenerationResult, kind: str, tokenizer=None) -> str:
    """`tokenizer`: the served base model's, needed when the line asked for logprobs or echo
    (`hotswap.openai_logprobs.needs_tokenizer`). MissingLogprobs if the result lacks asked-for logprobs."""
    hex_id = spec.id.removeprefix("req_")
    got = answer(kind, spec, result, tokenizer)
    build, prefix = (oa.chat_completion, "chatcmpl-") if kind == "chat" else (oa.completion, "cmpl-")
    body = build(prefix + hex_id, spec.model, int(spec.created_at), got.text, got.finish_reason,
                 result.prompt_tokens, result.completion_tokens, result.cached_tokens, logprobs=got.logprobs)
    return json.dumps({"id": line_id(spec), "custom_id": spec.custom_id,
                       "response": {"status_code": 200, "request_id": spec.id, "body": body}, "error": None})


def failure_line(spec: GenerationRequest, result: GenerationResult) -> str:
    error = result.error or {}
    code = error.get("code") or "server_error"
    message = error.get("message") or "the request failed"
    status = FAILURE_STATUS.get(code, 500)
    return json.dumps({"id": line_id(spec), "custom_id": spec.custom_id,
                       "response": {"status_code": status, "request_id": spec.id,
                                    "body": error_body(status, message, code=code)},
                       "error": {"code": code, "message": message}})


def unrun_line(custom_id: str | None, code: str, message: str, line_id_: str | None = None) -> str:
    """A request that never produced a response (expired, or cancelled outside a batch cancel)."""
    return json.dumps({"id": line_id_ or new_line_id(), "custom_id": custom_id, "response": None,
                       "error": {"code": code, "message": message}})


def expired_line(spec: GenerationRequest) -> str:
    return unrun_line(spec.custom_id, "batch_expired", EXPIRED_MESSAGE, line_id(spec))


def classify(spec: GenerationRequest, result: GenerationResult, kind: str, ending: str | None,
             tokenizer=None) -> tuple[str | None, str]:
    """Where a finished request goes: ("output" | "errors" | None, its line)."""
    if result.status == "completed":
        try:
            return "output", success_line(spec, result, kind, tokenizer)
        except MissingLogprobs as exc:  # a worker older than this scheduler ran it: say so, as the live API does
            failed = result.model_copy(update={"status": "failed", "error": {
                "code": "server_error", "message": f"{exc}: the worker that ran it does not report logprobs"}})
            return "errors", failure_line(spec, failed)
    if result.status == "failed":
        return "errors", failure_line(spec, result)
    # cancelled: by a batch cancel (goes nowhere), by expiry, or by someone else
    if ending == "cancelled":
        return None, ""
    if ending == "expired":
        return "errors", expired_line(spec)
    return "errors", unrun_line(spec.custom_id, "request_cancelled", "the request was cancelled", line_id(spec))


def write_result_file(files, tenant: str, filename: str, lines: Iterable[str]) -> str:
    """Store `lines` as a "batch_output" file named `filename` and return its id. Idempotent: if a
    file of that name exists already (a runner died after writing it), that one is the result,
    so a restarted runner never writes the results twice."""
    existing = [r for r in files.list(tenant, purpose="batch_output") if r.filename == filename]
    if existing:
        return existing[-1].id  # the oldest: list is newest first
    fd, tmp = tempfile.mkstemp(prefix="hotswap-batch-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line)
                f.write("\n")
        from pathlib import Path

        return files.create(tenant, "batch_output", filename, Path(tmp)).id
    finally:
        os.unlink(tmp)


def iter_redis_list(redis_client, key: str, chunk: int = 1000) -> Iterator[str]:
    start = 0
    while True:
        part = redis_client.lrange(key, start, start + chunk - 1)
        for item in part:
            yield keys.text(item)
        if len(part) < chunk:
            return
        start += chunk
