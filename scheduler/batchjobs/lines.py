"""Validation of a batch input file, line by line, with the live API's own code.

`validate_lines` reads the file once. Envelope problems (see the rule in `scheduler/batchjobs/records.py`) are
collected as `errors.data` entries and fail the batch; bodies are judged by the same pydantic
models and `build_request` as the live endpoints, and a refused body becomes an error-file line.
Requests that pass go to `sink` in file order, ready to queue (priority "batch").
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pydantic import ValidationError
from redis.exceptions import RedisError

from hotswap import safe_json
from hotswap.openai_schemas import ChatCompletionRequest, CompletionRequest, error_message, lone_surrogate
from hotswap.protocol import GenerationRequest
from scheduler.prepare import PrepareError, ServedModel, build_request

log = logging.getLogger("hotswap.jobs")

MAX_LISTED_ERRORS = 100
LINE_KEYS = ("custom_id", "method", "url", "body")
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 429: "rate_limit_error", 503: "service_unavailable"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The OpenAI error envelope (the same as api/errors.py answers)."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_line_id() -> str:
    return "batch_req_" + secrets.token_hex(16)


def refused_line(custom_id: str, status: int, message: str, param: str | None, code: str | None) -> str:
    """An error-file line for a body the live API would have refused with `status`."""
    body = error_body(status, message, param, code)
    return json.dumps({"id": new_line_id(), "custom_id": custom_id,
                       "response": {"status_code": status, "request_id": None, "body": body},
                       "error": {"code": code or body["error"]["type"], "message": message}})


@dataclass
class Validation:
    total: int = 0  # non-blank lines
    errors: list[dict] = field(default_factory=list)  # envelope problems: the batch fails
    error_count: int = 0  # all of them, when more than MAX_LISTED_ERRORS
    refused: list[str] = field(default_factory=list)  # error-file lines of refused bodies
    prepared: int = 0  # requests handed to the sink
    models: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.errors


def _structural(v: Validation, line: int, code: str, message: str, param: str | None = None) -> None:
    v.error_count += 1
    if len(v.errors) < MAX_LISTED_ERRORS:
        v.errors.append({"code": code, "message": f"line {line}: {message}", "param": param, "line": line})


def validate_lines(lines: Iterable[bytes], *, endpoint: str, tenant: str, batch_id: str, served: ServedModel,
                   registry, max_lines: int, sink: Callable[[GenerationRequest], None],
                   progress: Callable[[int], None] | None = None) -> Validation:
    """Judge every line; `sink` gets each request that will run. Once an envelope problem is found
    the batch will fail, so bodies are no longer prepared (but envelopes still checked, to list
    every problem of the file at once). Raises nothing for bad input: it all ends up in the result."""
    model_cls = ChatCompletionRequest if endpoint == "/v1/chat/completions" else CompletionRequest
    v = Validation()
    seen: dict[str, int] = {}
    number = 0
    for number, raw in enumerate(lines, start=1):
        if progress and number % 1000 == 0:
            progress(number)
        if not raw.strip():
            continue
        v.total += 1
        if v.total > max_lines:
            _structural(v, number, "batch_too_large", f"the file has more than {max_lines} requests, the most a batch "
                        f"takes on this server (HOTSWAP_BATCH_MAX_LINES); split it into several batches")
            break
        try:
            obj = safe_json.loads(raw)
        except UnicodeDecodeError:
            _structural(v, number, "invalid_json_line", "not valid UTF-8")
            continue
        except ValueError as exc:
            _structural(v, number, "invalid_json_line", f"not valid JSON ({exc})")
            continue
        if not isinstance(obj, dict):
            _structural(v, number, "invalid_json_line", "not a JSON object")
            continue
        extra = [k for k in obj if k not in LINE_KEYS]
        if extra:
            _structural(v, number, "unsupported_parameter", f"unexpected key(s) {', '.join(map(repr, extra))}; a "
                        "line has custom_id, method, url and body only", param=extra[0])
        custom_id = obj.get("custom_id")
        if custom_id is None:
            _structural(v, number, "missing_required_parameter", "custom_id is required", "custom_id")
        elif not isinstance(custom_id, str) or not custom_id or lone_surrogate(custom_id):
            _structural(v, number, "invalid_custom_id", "custom_id must be a non-empty string of valid Unicode",
                        "custom_id")
        elif custom_id in seen:
            _structural(v, number, "duplicate_custom_id", f"custom_id {custom_id!r} is already used on line "
                        f"{seen[custom_id]}; each request needs its own", "custom_id")
        else:
            seen[custom_id] = number
        method = obj.get("method")
        if method != "POST":
            _structural(v, number, "invalid_method", f"method must be 'POST', got {method!r}", "method")
        url = obj.get("url")
        if url != endpoint:
            _structural(v, number, "invalid_url", f"url must be the batch's endpoint {endpoint!r}, got {url!r}", "url")
        body = obj.get("body")
        if not isinstance(body, dict):
            _structural(v, number, "missing_required_parameter" if body is None else "invalid_body",
                        "body must be a JSON object (the request to run)", "body")
            continue
        if not v.ok:
            continue
        req = _prepare(v, custom_id, body, model_cls, tenant, batch_id, served, registry)
        if req is not None:
            v.prepared += 1
            v.models.add(req.model)
            sink(req)
    if v.total == 0:
        _structural(v, max(number, 1), "empty_file", "the file has no requests")
    return v


def _prepare(v: Validation, custom_id: str, body: dict, model_cls, tenant: str, batch_id: str,
             served: ServedModel, registry) -> GenerationRequest | None:
    try:
        parsed = model_cls.model_validate(body)
    except ValidationError as exc:
        param, message = error_message(exc)
        kind = exc.errors()[0]["type"]
        code = kind if kind in ("unsupported_parameter", "invalid_unicode") else None
        v.refused.append(refused_line(custom_id, 400, message, param, code))
        return None
    if parsed.stream:
        v.refused.append(refused_line(custom_id, 400, "stream: streaming is not supported in a batch; leave stream "
                                      "unset or false", "stream", "unsupported_parameter"))
        return None
    try:
        return build_request(parsed, tenant, served, registry, priority="batch", batch_id=batch_id,
                             custom_id=custom_id)
    except PrepareError as exc:
        v.refused.append(refused_line(custom_id, exc.status, exc.message, exc.param, exc.code))
    except (RedisError, OSError):
        raise  # the infrastructure, not this line: the whole validation is retried
    except Exception:  # our fault, but this line's alone: it goes to the error file, the batch runs on
        log.exception("batch %s: line %r could not be prepared", batch_id, custom_id)
        v.refused.append(refused_line(custom_id, 500, "internal error preparing this request; the server logged "
                                      "the details", None, "internal_error"))
    return None
