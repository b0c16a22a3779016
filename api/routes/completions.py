"""POST /v1/completions: the OpenAI (legacy) completions API, for plain prompts."""

from __future__ import annotations

from fastapi import APIRouter, Request

from api.deps import TenantDep
from api.generation import respond
from hotswap.openai_schemas import CompletionRequest

router = APIRouter(tags=["completions"])


@router.post("/v1/completions", summary="Create a completion (streams with stream=true)")
async def create_completion(body: CompletionRequest, request: Request, tenant: TenantDep):
    return await respond(request, body, "completion", tenant)
