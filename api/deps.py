"""FastAPI dependencies: settings (overridable in tests), clients built once per app, the tenant."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.errors import APIError
from hotswap.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_redis(request: Request):
    return request.app.state.redis


def get_store(request: Request):
    return request.app.state.store


def get_registry(request: Request):
    return request.app.state.registry


def get_files(request: Request):
    return request.app.state.files


def current_tenant(request: Request, redis_client=Depends(get_redis)) -> str:
    from api.auth import tenant_for_key

    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(401, "missing API key: send 'Authorization: Bearer YOUR_KEY' "
                            "(create one with `hotswap keys create --tenant NAME`)", code="missing_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    tenant = tenant_for_key(redis_client, key.strip())
    if tenant is None:
        raise APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return tenant


SettingsDep = Annotated[Settings, Depends(get_settings)]
TenantDep = Annotated[str, Depends(current_tenant)]
