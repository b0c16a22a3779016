"""POST /v1/chat/completions: the OpenAI chat API on the base model, an adapter or a fine-tune."""

from __future__ import annotations

from fastapi import APIRouter, Request

from api.deps import TenantDep
from api.generation import respond
from hotswap.openai_schemas import ChatCompletionRequest

router = APIRouter(tags=["chat"])


@router.post("/v1/chat/completions", summary="Create a chat completion (streams with stream=true)")
async def create_chat_completion(body: ChatCompletionRequest, request: Request, tenant: TenantDep):
    return await respond(request, body, "chat", tenant)
