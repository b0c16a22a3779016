"""GET /v1/models: the base model and the caller's adapters and fine-tunes (each with its parent)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool

from api.deps import SettingsDep, TenantDep, get_registry
from api.errors import APIError

router = APIRouter(tags=["models"])


def _base(settings) -> dict:
    return {"id": settings.base_model, "object": "model", "created": 0, "owned_by": "hotswap",
            "root": settings.base_model, "parent": None, "kind": "base"}


def _entry(record, tenant: str, base: str) -> dict:
    # `id` is what clients put in `model`: the name (its latest version); `root` pins the version.
    return {"id": record.name, "object": "model", "created": int(record.created_at), "owned_by": tenant,
            "root": record.ref, "parent": base, "kind": record.kind, "version": record.version}


@router.get("/v1/models", summary="List the models you can call")
async def list_models(settings: SettingsDep, tenant: TenantDep, registry=Depends(get_registry)) -> dict:
    records = await run_in_threadpool(registry.list, tenant)
    return {"object": "list", "data": [_base(settings)] + [_entry(r, tenant, settings.base_model) for r in records]}


@router.get("/v1/models/{model:path}", summary="Retrieve one model (`name` or `name@version`)")
async def get_model(model: str, settings: SettingsDep, tenant: TenantDep, registry=Depends(get_registry)) -> dict:
    if model == settings.base_model:
        return _base(settings)
    from adapters.registry import NotFound

    try:
        record = await run_in_threadpool(registry.resolve, tenant, model)
    except (NotFound, ValueError):
        raise APIError(404, f"The model '{model}' does not exist or you do not have access to it.",
                       param="model", code="model_not_found") from None
    return _entry(record, tenant, settings.base_model)
