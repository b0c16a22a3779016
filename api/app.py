"""The API front: `create_app(settings)` builds the FastAPI app; clients are made once, at startup."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.errors import install_error_handlers
from hotswap.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import redis

        from adapters.registry import Registry
        from hotswap.files import FileCatalog
        from hotswap.storage import open_store

        app.state.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=10)
        app.state.store = open_store(settings)
        app.state.registry = Registry(app.state.redis, app.state.store)
        app.state.files = FileCatalog(app.state.redis, app.state.store)
        try:
            yield
        finally:
            app.state.redis.close()

    app = FastAPI(title="hotswap", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible serving of many fine-tunes of one base model.")
    app.state.settings = settings
    install_error_handlers(app)

    @app.middleware("http")
    async def upload_size_limit(request, call_next):
        # Refuse oversized uploads before their body is read and spooled to disk.
        limit = settings.max_upload_mb * 2**20
        length = request.headers.get("content-length")
        if request.method == "POST" and length and length.isdigit() and int(length) > limit:
            from api.errors import error_response

            return error_response(413, f"upload of {int(length):,} bytes exceeds this server's limit of "
                                       f"{settings.max_upload_mb} MB (HOTSWAP_MAX_UPLOAD_MB)", code="upload_too_large")
        return await call_next(request)

    from api.routes import adapters, files, health

    app.include_router(health.router)
    app.include_router(adapters.base_router)
    app.include_router(adapters.router)
    app.include_router(files.router)
    return app
