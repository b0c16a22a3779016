"""`GET /metrics`: the whole system's Prometheus metrics (see `api/metrics.py`), no auth.

Every API replica shows the same numbers: they come from Redis, not from this process. The
`model` label carries the tenant name (e.g. "lora:acme/bot@1"), so keep this endpoint reachable by
your Prometheus only (not through the public ingress).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

router = APIRouter(tags=["metrics"])


def _registry(request: Request):
    state = request.app.state
    registry = getattr(state, "metrics_registry", None)
    if registry is None:  # one per app, made on first scrape (the Redis client exists from startup on)
        from api.metrics import make_registry

        registry = state.metrics_registry = make_registry(state.redis, [state.settings.base_model])
    return registry


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    # A plain `def`: FastAPI runs it in a thread, so the Redis reads never block the event loop.
    import redis
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    try:
        body = generate_latest(_registry(request))
    except redis.RedisError as exc:
        return PlainTextResponse(f"# metrics unavailable: Redis error: {exc}\n", status_code=503)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
