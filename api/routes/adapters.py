"""Adapters and full fine-tunes of the caller's tenant: upload, list, show, delete.

Uploads are multipart (`name`, optional `base_model`, one `files` part per file). Starlette spools
each part to disk, we copy it into a temp dir in chunks, validate the whole dir with
adapters.format (pickles are refused by name, never opened), and only then register it: a bad
upload leaves no record and no object behind.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, UploadFile

from adapters.format import UPLOADABLE_FILE
from api.deps import SettingsDep, TenantDep, get_registry
from api.errors import APIError

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])



def record_json(record) -> dict:
    return {
        "id": record.ref, "object": "adapter", "name": record.name, "version": record.version,
        "kind": record.kind, "base_model": record.base_model, "rank": record.rank,
        "target_modules": list(record.target_modules) if record.target_modules else None,
        "alpha": record.alpha, "use_rslora": record.use_rslora, "size_bytes": record.size_bytes,
        "sha256": record.sha256, "created_at": int(record.created_at), "deleted": record.deleted,
    }


def base_config(settings) -> dict:
    from hotswap.base_model import BaseModelMissing, read_config

    try:
        return read_config(settings)
    except BaseModelMissing as exc:
        raise APIError(503, str(exc), code="model_files_missing") from None


base_router = APIRouter(tags=["adapters"])


@base_router.get("/v1/hotswap/base-model")
def get_base_model(settings: SettingsDep, tenant: TenantDep) -> dict:
    """The base model's name and config.json, and the highest LoRA rank this server accepts, so the CLI
    validates an adapter before uploading it exactly as the upload route will."""
    return {"name": settings.base_model, "config": base_config(settings), "max_lora_rank": settings.max_lora_rank}


def _check_base(base_model: str, settings) -> None:
    if base_model != settings.base_model:
        raise APIError(400, f"unknown base model {base_model!r}: this server serves {settings.base_model!r}",
                       param="base_model")


@router.post("", status_code=201)
async def upload(
    settings: SettingsDep,
    tenant: TenantDep,
    name: Annotated[str, Form(description="Name to call it by (lowercase letters, digits, '-', '_', '.').")],
    files: Annotated[list[UploadFile], File(description="adapter_config.json + adapter_model.safetensors, "
                                                         "or a full checkpoint's config.json + *.safetensors")],
    base_model: Annotated[str | None, Form()] = None,
    registry=Depends(get_registry),
):
    from adapters.errors import AdapterFormatError
    from adapters.format import inspect
    from adapters.names import validate_name

    try:
        validate_name(name)
    except ValueError as exc:
        raise APIError(400, str(exc), param="name") from None
    base_model = base_model or settings.base_model
    _check_base(base_model, settings)
    filenames = [f.filename or "" for f in files]
    bad = [n for n in filenames if not UPLOADABLE_FILE.match(n)]  # a bare, known name: never a path
    if bad:
        shown = ", ".join(repr(n if len(n) <= 80 else n[:77] + "...") for n in bad[:5])  # names may be huge
        shown += f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise APIError(400, f"file(s) not accepted: {shown}; send safetensors weights and their JSON configs "
                            "only (pickled .bin/.pt files are never loaded)", param="files")
    if len(set(filenames)) != len(filenames):
        raise APIError(400, "the same file name was sent twice", param="files")

    def validate_and_register(tmp: Path):
        try:
            info = inspect(tmp, base_config(settings), settings.max_lora_rank, check_finite=True)
        except AdapterFormatError as exc:
            raise APIError(400, str(exc), param="files") from None
        return registry.register(tenant, name, info.kind, base_model, tmp, info)

    limit = settings.max_upload_mb * 2**20
    with tempfile.TemporaryDirectory(prefix="hotswap-upload-") as tmp:
        total = 0
        for upload_file in files:
            with open(Path(tmp) / upload_file.filename, "wb") as dst:
                total += await asyncio.to_thread(_copy_at_most, upload_file.file, dst, limit - total,
                                                 settings.max_upload_mb)
        record = await asyncio.to_thread(validate_and_register, Path(tmp))
    return record_json(record)


def _copy_at_most(src, dst, budget: int, limit_mb: int) -> int:
    """Copy in 1 MiB chunks; a 413 as soon as the upload (chunked, so no Content-Length) runs over."""
    copied = 0
    while chunk := src.read(1 << 20):
        copied += len(chunk)
        if copied > budget:
            raise APIError(413, f"upload exceeds this server's limit of {limit_mb} MB (HOTSWAP_MAX_UPLOAD_MB)",
                           code="upload_too_large")
        dst.write(chunk)
    return copied


@router.get("")
def list_adapters(tenant: TenantDep, registry=Depends(get_registry)) -> dict:
    return {"object": "list", "data": [record_json(r) for r in registry.list(tenant)]}


def _resolve(registry, tenant: str, ref: str):
    from adapters.registry import NotFound

    try:
        return registry.resolve(tenant, ref)
    except NotFound as exc:
        raise APIError(404, str(exc), param="adapter") from None
    except ValueError as exc:
        raise APIError(400, str(exc), param="adapter") from None


@router.get("/{ref}")
def show(ref: str, tenant: TenantDep, registry=Depends(get_registry)) -> dict:
    record = _resolve(registry, tenant, ref)
    body = record_json(record)
    body["versions"] = [r.version for r in registry.versions(tenant, record.name)]
    return body


@router.delete("/{ref}")
def delete(ref: str, tenant: TenantDep, registry=Depends(get_registry)) -> dict:
    _resolve(registry, tenant, ref)  # 404 for unknown names, 400 for bad refs
    deleted = registry.delete(tenant, ref)
    return {"object": "adapter.deleted", "id": ref, "deleted": True, "versions": [r.version for r in deleted]}
