"""The OpenAI error envelope for every error: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hotswap.openai_schemas import printable

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


class APIError(Exception):
    """Raise anywhere in a route: becomes a JSON error with this status and message."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def _utf8(text: str | None) -> str | None:
    """Lone surrogates (a client may send "\\ud800" inside a name) as visible escapes: UTF-8 cannot hold them."""
    return text if text is None else printable(text)


def envelope(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    message, param = _utf8(message), _utf8(param)
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error" if status >= 500 else
                                                             "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(envelope(status, message, param, code), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        # OpenAI answers bad parameters with a 400 naming the parameter.
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "unsupported_parameter":  # names every unsupported parameter at once
            return error_response(400, first["msg"], param=first["ctx"]["names"].split(", ")[0],
                                  code="unsupported_parameter")
        if "param" in first.get("ctx", {}):  # the error names a place its loc does not (deeper, or a model check)
            code = "invalid_unicode" if first["type"] == "invalid_unicode" else None
            return error_response(400, first["msg"], param=first["ctx"]["param"], code=code)
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON: "
                                       f"{first.get('ctx', {}).get('error', 'parse error')}", code="invalid_json")
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "form")]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
        return error_response(400, message, param=param)
    # Any other exception is answered by api.boundary.ErrorBoundary (it must not re-raise).
