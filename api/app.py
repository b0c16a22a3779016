"""The API front: `create_app(settings)` builds the FastAPI app; clients are made once, at startup."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.errors import install_error_handlers
from hotswap.settings import Settings, get_settings


def body_limit(settings: Settings, method: str, path: str) -> tuple[int, str] | None:
    """The most bytes a request body may have, and what to do instead (None: no body expected)."""
    if method not in ("POST", "PUT", "PATCH"):
        return None
    if path == "/v1/adapters":
        return settings.max_upload_mb * 2**20, "HOTSWAP_MAX_UPLOAD_MB sets it"
    if path == "/v1/files":  # + room for the multipart envelope around the file
        return settings.max_batch_file_mb * 2**20 + 2**16, "split it into several batches (HOTSWAP_MAX_BATCH_FILE_MB)"
    return settings.max_request_mb * 2**20, "send a shorter prompt (HOTSWAP_MAX_REQUEST_MB sets the limit)"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import redis
        import redis.asyncio

        from adapters.registry import Registry
        from hotswap.base_model import BaseModelMissing, load_served_base
        from hotswap.storage import open_store
        from scheduler.aio import AsyncQueues
        from scheduler.batchjobs.files import FileCatalog
        from scheduler.batchjobs.records import JobStore  # batch jobs (records only; the scheduler runs them)

        app.state.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=10)
        app.state.store = open_store(settings)
        app.state.registry = Registry(app.state.redis, app.state.store)
        app.state.files = FileCatalog(app.state.redis, app.state.store)
        app.state.jobs = JobStore(app.state.redis, window_s=settings.batch_completion_window_s)
        # A blocking pool: when every connection is in use (one per in-flight request's read), a call
        # waits for one rather than failing the request with "Too many connections" (redis-py's plain
        # pool raises at its cap, 100 by default since redis-py 8).
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=settings.api_redis_connections, timeout=30, socket_timeout=30)
        app.state.aredis = redis.asyncio.Redis.from_pool(pool)  # owns the pool: aclose() closes it
        app.state.aqueues = AsyncQueues(app.state.aredis, result_ttl_s=settings.result_ttl_s)
        try:  # the API tokenizes; it never loads weights. Missing files: generation answers 503
            app.state.served_base = load_served_base(settings)
        except BaseModelMissing as exc:
            app.state.served_base, app.state.served_base_missing = None, str(exc)
        try:
            yield
        finally:
            app.state.redis.close()
            await app.state.aredis.aclose()

    app = FastAPI(title="hotswap", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible serving of many fine-tunes of one base model.")
    app.state.settings = settings
    install_error_handlers(app)

    from api.boundary import BodyLimit, ErrorBoundary

    app.add_middleware(BodyLimit, limit_for=lambda method, path: body_limit(settings, method, path))
    app.add_middleware(ErrorBoundary)  # added last: the outermost, so it also sees BodyLimit's errors

    from api.routes import adapters, batches, chat, completions, files, health, models

    app.include_router(health.router)
    app.include_router(adapters.base_router)
    app.include_router(adapters.router)
    app.include_router(files.router)
    app.include_router(batches.router)
    app.include_router(chat.router)
    app.include_router(completions.router)
    app.include_router(models.router)
    from api.routes import metrics as metrics_route  # GET /metrics (Prometheus, no auth)

    app.include_router(metrics_route.router)
    return app
