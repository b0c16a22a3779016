"""Liveness and readiness: ready only when Redis and storage answer."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request):
    state = request.app.state
    checks = {}
    for name, probe in (("redis", lambda: state.redis.ping()), ("storage", lambda: state.store.list(".readyz"))):
        try:
            await asyncio.wait_for(asyncio.to_thread(probe), timeout=3)
            checks[name] = "ok"
        except Exception as exc:  # any failure means not ready; say which and why
            checks[name] = f"error: {type(exc).__name__}: {exc}"[:200]
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503)
