"""The OpenAI Batch API: create, retrieve, list and cancel batch jobs; plus
`GET /v1/batches/{id}/results`, presigned S3 URLs of a finished batch's output and error files.

The route only checks the request and records the job (status "validating"); the job runner in
`hotswap scheduler` validates the file, runs the lines and writes the results (scheduler/batchjobs/records.py
says what goes where). Another tenant's batch id is a 404, exactly like one that never existed.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, model_validator

from api.deps import SettingsDep, TenantDep, get_files
from api.errors import APIError
from scheduler.batchjobs.files import FileNotFound
from hotswap.openai_schemas import refuse_lone_surrogates
from scheduler.batchjobs.records import ENDPOINTS, JobNotFound, JobStateError, check_metadata

router = APIRouter(prefix="/v1/batches", tags=["batches"])


def get_jobs(request: Request):
    return request.app.state.jobs


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict | None = None
    output_expires_after: dict | None = None  # accepted and ignored: result files are kept until deleted

    _valid_text = model_validator(mode="before")(refuse_lone_surrogates)


def _get(jobs, tenant: str, batch_id: str):
    try:
        return jobs.get(tenant, batch_id)
    except JobNotFound:
        raise APIError(404, f"No such Batch object: {batch_id}", param="batch_id") from None


@router.post("")
def create(body: BatchCreate, settings: SettingsDep, tenant: TenantDep, jobs=Depends(get_jobs),
           files=Depends(get_files)) -> dict:
    if body.endpoint not in ENDPOINTS:
        raise APIError(400, f"endpoint must be one of {', '.join(ENDPOINTS)} (the endpoints this server batches), "
                            f"got {body.endpoint!r}", param="endpoint")
    if body.completion_window != "24h":
        raise APIError(400, f"completion_window must be '24h', got {body.completion_window!r}",
                       param="completion_window")
    try:
        metadata = check_metadata(body.metadata)
    except ValueError as exc:
        raise APIError(400, f"metadata: {exc}", param="metadata") from None
    try:
        record = files.get(tenant, body.input_file_id)
    except FileNotFound:
        raise APIError(404, f"input_file_id: no such File object: {body.input_file_id}", param="input_file_id") from None
    if record.purpose != "batch":
        raise APIError(400, f"input_file_id: file {body.input_file_id} has purpose {record.purpose!r}; a batch "
                            "reads a file uploaded with purpose 'batch'", param="input_file_id")
    job = jobs.create(tenant, body.input_file_id, body.endpoint, metadata, window_s=settings.batch_completion_window_s)
    return job.to_openai()


@router.get("")
def list_batches(
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
    jobs=Depends(get_jobs),
) -> dict:
    records = jobs.list(tenant, limit=limit + 1, after=after)
    page = records[:limit]
    return {"object": "list", "data": [r.to_openai() for r in page], "has_more": len(records) > limit,
            "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None}


@router.get("/{batch_id}")
def retrieve(batch_id: str, tenant: TenantDep, jobs=Depends(get_jobs)) -> dict:
    return _get(jobs, tenant, batch_id).to_openai()


@router.post("/{batch_id}/cancel")
def cancel(batch_id: str, tenant: TenantDep, jobs=Depends(get_jobs)) -> dict:
    try:
        return jobs.cancel(tenant, batch_id).to_openai()
    except JobNotFound:
        raise APIError(404, f"No such Batch object: {batch_id}", param="batch_id") from None
    except JobStateError as exc:
        raise APIError(409, str(exc), code="batch_not_cancellable") from None


@router.get("/{batch_id}/results")
def results(
    batch_id: str,
    settings: SettingsDep,
    tenant: TenantDep,
    expires_in: Annotated[int | None, Query(ge=60, le=7 * 86400, description="Seconds (S3 allows 7 days).")] = None,
    jobs=Depends(get_jobs),
    files=Depends(get_files),
) -> dict:
    """hotswap extension: presigned GETs of the output and error files (null where a batch has none)."""
    record = _get(jobs, tenant, batch_id)
    if record.status not in ("completed", "cancelled", "expired"):
        raise APIError(400, f"batch {batch_id} is {record.status}: results exist once it is completed, cancelled or "
                            "expired", code="batch_not_finished")
    if settings.resolved_storage_url.startswith("file://"):
        raise APIError(400, "presigned URLs need S3 storage (HOTSWAP_STORAGE_URL=s3://...); download the files "
                            "through GET /v1/files/{id}/content instead", code="presign_unsupported")
    expires_s = expires_in or settings.presign_expiry_s

    def url(file_id: str | None) -> str | None:
        if file_id is None:
            return None
        try:
            return files.presigned_url(tenant, file_id, expires_s)
        except FileNotFound:  # the user deleted it
            return None

    return {"output_url": url(record.output_file_id), "error_url": url(record.error_file_id),
            "expires_at": int(time.time()) + expires_s}
