"""The API's two outer middlewares on a small app of their own, over real HTTP (uvicorn): the error
boundary answers every escaped exception in the envelope and keeps the connection; the body limit
refuses by size before reading, with and without Content-Length."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import pytest
from fastapi import FastAPI, Request

from api.boundary import BodyLimit, ErrorBoundary
from api.errors import install_error_handlers
from tests.api.conftest import LiveServer

LIMIT = 1000


def make_app() -> FastAPI:
    import redis

    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit_for=lambda method, path: (LIMIT, "send less") if method == "POST" else None)
    app.add_middleware(ErrorBoundary)

    @app.get("/bug")
    def bug():
        raise RuntimeError("a bug of ours")

    @app.get("/redis-down")
    def redis_down():
        raise redis.exceptions.ConnectionError("Connection refused")

    @app.get("/surrogate")
    def surrogate():
        return "\ud800".encode()

    @app.get("/healthz")
    def ok():
        return {"ok": True}

    @app.post("/echo")
    async def echo(request: Request):
        return {"bytes": len(await request.body())}

    return app


@pytest.fixture(scope="module")
def server():
    with LiveServer(make_app()) as live:
        yield urlsplit(live.url)


def call(conn: http.client.HTTPConnection, method: str, path: str, body=None, headers=None, chunked=False):
    conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
    resp = conn.getresponse()
    return resp, json.loads(resp.read())


@pytest.mark.parametrize("path, status, code", [("/bug", 500, "internal_error"),
                                                ("/redis-down", 503, "redis_unavailable"),
                                                ("/surrogate", 400, "invalid_unicode")])
def test_an_escaped_exception_is_answered_and_the_connection_kept(server, path, status, code):
    conn = http.client.HTTPConnection(server.hostname, server.port, timeout=10)
    resp, body = call(conn, "GET", path)
    assert resp.status == status and body["error"]["code"] == code and not resp.will_close
    if status == 503:
        assert resp.getheader("Retry-After") == "2"
    sock = conn.sock
    resp, body = call(conn, "GET", "/healthz")
    assert resp.status == 200 and body == {"ok": True} and conn.sock is sock
    conn.close()


def test_a_body_over_the_limit_is_refused_by_its_length(server):
    conn = http.client.HTTPConnection(server.hostname, server.port, timeout=10)
    resp, body = call(conn, "POST", "/echo", body=b"x" * (LIMIT + 1))
    assert resp.status == 413 and body["error"]["code"] == "request_too_large" and "send less" in body["error"]["message"]
    resp, body = call(conn, "POST", "/echo", body=b"x" * LIMIT)
    assert resp.status == 200 and body == {"bytes": LIMIT}


def test_a_chunked_body_is_refused_once_it_runs_over(server):
    conn = http.client.HTTPConnection(server.hostname, server.port, timeout=10)
    resp, body = call(conn, "POST", "/echo", body=iter([b"x" * 600, b"x" * 600]), chunked=True)
    assert resp.status == 413 and "send less" in body["error"]["message"]
    conn = http.client.HTTPConnection(server.hostname, server.port, timeout=10)
    resp, body = call(conn, "POST", "/echo", body=iter([b"x" * 300, b"x" * 300]), chunked=True)
    assert resp.status == 200 and body == {"bytes": 600}
