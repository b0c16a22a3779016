"""The OpenAI Files API for batch inputs (purpose "batch") and the results batches write
("batch_output"): upload, list, retrieve, content, delete; plus `GET /v1/files/{id}/url`, a
presigned S3 URL so large results can be fetched with any S3 client instead of through the API.

An upload is checked before it is stored: purpose "batch" only, not empty, at most
HOTSWAP_MAX_BATCH_FILE_MB, and JSONL (every non-blank line one JSON object). What each line asks
for is checked later, by POST /v1/batches, which knows the models. Another tenant's file id is a
404, exactly like an id that never existed.
"""

from __future__ import annotations

import time
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from api.deps import SettingsDep, TenantDep, get_files
from api.errors import APIError
from hotswap import safe_json
from scheduler.batchjobs.files import FileNotFound

router = APIRouter(prefix="/v1/files", tags=["files"])


def _get(files, tenant: str, file_id: str):
    try:
        return files.get(tenant, file_id)
    except FileNotFound:
        raise APIError(404, f"No such File object: {file_id}", param="file_id") from None


def _too_large(limit_mb: int) -> APIError:
    return APIError(413, f"file exceeds this server's limit of {limit_mb} MB for batch files "
                         "(HOTSWAP_MAX_BATCH_FILE_MB); split it into several batches",
                    param="file", code="file_too_large")


def check_jsonl(stream, limit_mb: int) -> int:
    """Size and JSONL checks on an uploaded file, streamed line by line; returns its size."""
    size = lines = 0
    for number, line in enumerate(stream, start=1):
        size += len(line)
        if size > limit_mb * 2**20:
            raise _too_large(limit_mb)
        if not line.strip():
            continue
        try:
            obj = safe_json.loads(line)
        except UnicodeDecodeError:
            raise APIError(400, f"file: line {number} is not valid UTF-8", param="file") from None
        except ValueError as exc:
            raise APIError(400, f"file must be JSONL: line {number} is not valid JSON ({exc})", param="file") from None
        if not isinstance(obj, dict):
            raise APIError(400, f"file must be JSONL: line {number} is not a JSON object", param="file")
        lines += 1
    if size == 0:
        raise APIError(400, "file is empty", param="file")
    if lines == 0:
        raise APIError(400, "file has no requests: every line is blank", param="file")
    return size


@router.post("")
def upload(
    settings: SettingsDep,
    tenant: TenantDep,
    file: Annotated[UploadFile, File(description="A .jsonl file, one request per line.")],
    purpose: Annotated[str, Form(description='Only "batch" is accepted.')],
    files=Depends(get_files),
) -> dict:
    if purpose != "batch":
        raise APIError(400, f"purpose must be 'batch' (the only purpose this server accepts for uploads), "
                            f"got {purpose!r}", param="purpose")
    if file.size is not None and file.size > settings.max_batch_file_mb * 2**20:
        raise _too_large(settings.max_batch_file_mb)
    check_jsonl(file.file, settings.max_batch_file_mb)
    file.file.seek(0)
    record = files.create(tenant, "batch", file.filename or "batch.jsonl", file.file)
    return record.to_openai()


@router.get("")
def list_files(
    tenant: TenantDep,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    after: str | None = None,
    files=Depends(get_files),
) -> dict:
    records = files.list(tenant, purpose=purpose, limit=limit + 1, after=after)
    page = records[:limit]
    return {"object": "list", "data": [r.to_openai() for r in page], "has_more": len(records) > limit,
            "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None}


@router.get("/{file_id}")
def retrieve(file_id: str, tenant: TenantDep, files=Depends(get_files)) -> dict:
    return _get(files, tenant, file_id).to_openai()


@router.get("/{file_id}/content")
def content(file_id: str, tenant: TenantDep, files=Depends(get_files)) -> StreamingResponse:
    record = _get(files, tenant, file_id)
    try:
        chunks = files.open(tenant, file_id)
    except FileNotFound:
        raise APIError(404, f"No such File object: {file_id}", param="file_id") from None
    disposition = f"attachment; filename*=UTF-8''{quote(record.filename, safe='')}"
    return StreamingResponse(chunks, media_type="application/octet-stream",
                             headers={"Content-Length": str(record.bytes), "Content-Disposition": disposition})


@router.delete("/{file_id}")
def delete(file_id: str, tenant: TenantDep, files=Depends(get_files)) -> dict:
    try:
        files.delete(tenant, file_id)
    except FileNotFound:
        raise APIError(404, f"No such File object: {file_id}", param="file_id") from None
    return {"id": file_id, "object": "file", "deleted": True}


@router.get("/{file_id}/url")
def presigned_url(
    file_id: str,
    settings: SettingsDep,
    tenant: TenantDep,
    expires_in: Annotated[int | None, Query(ge=60, le=7 * 86400, description="Seconds (S3 allows 7 days).")] = None,
    files=Depends(get_files),
) -> dict:
    """hotswap extension: a presigned GET of the file's bytes, for any HTTP or S3 client."""
    _get(files, tenant, file_id)
    expires_s = expires_in or settings.presign_expiry_s
    url = files.presigned_url(tenant, file_id, expires_s)
    if url is None:
        raise APIError(400, "presigned URLs need S3 storage (HOTSWAP_STORAGE_URL=s3://...); "
                            f"download through GET /v1/files/{file_id}/content instead", code="presign_unsupported")
    return {"url": url, "expires_at": int(time.time()) + expires_s}
