"""OpenAI's Responses API under /v1/responses (thin: the logic lives in responses_serving)."""

from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from . import responses_serving
from .context import ServerContext
from .openai_routes import get_ctx
from .params import reject_invalid_text
from .protocol import OpenAIError
from .responses_protocol import DeletedResponse, InputItemList, ResponseObject, ResponsesRequest

router = APIRouter(tags=["OpenAI Responses"])

_ERRORS = {code: {"model": OpenAIError} for code in (400, 401, 404, 429, 500, 503)}


@router.post("/v1/responses", response_model=ResponseObject, responses=_ERRORS)
async def create(body: ResponsesRequest, request: Request, ctx: ServerContext = Depends(get_ctx)) -> Response:
    """A model response, streamed as typed ``response.*`` events when ``stream`` is true."""
    reject_invalid_text(body)
    ctx.check_slot("responses")  # a full server refuses before the conversation is templated and tokenized
    return await responses_serving.create_response(ctx, body, request)


@router.get("/v1/responses/{response_id}", response_model=ResponseObject, responses=_ERRORS)
async def retrieve(response_id: str, stream: bool = False, ctx: ServerContext = Depends(get_ctx)) -> ResponseObject:
    """A stored response (``store`` true), finished or still in progress; 404 once gone."""
    return responses_serving.retrieve_response(ctx, response_id, stream)


@router.delete("/v1/responses/{response_id}", response_model=DeletedResponse, responses=_ERRORS)
async def delete(response_id: str, ctx: ServerContext = Depends(get_ctx)) -> DeletedResponse:
    """Forget a stored response (stopping it if it runs)."""
    return responses_serving.delete_response(ctx, response_id)


@router.post("/v1/responses/{response_id}/cancel", response_model=ResponseObject, responses=_ERRORS)
async def cancel(response_id: str, ctx: ServerContext = Depends(get_ctx)) -> ResponseObject:
    """Stop a response that is still being generated."""
    return responses_serving.cancel_response(ctx, response_id)


@router.get("/v1/responses/{response_id}/input_items", response_model=InputItemList, responses=_ERRORS)
async def input_items(response_id: str, after: Optional[str] = None, limit: int = 20, order: str = "desc",
                      ctx: ServerContext = Depends(get_ctx)) -> InputItemList:
    """The input items of a stored response, a page at a time."""
    return responses_serving.list_input_items(ctx, response_id, after, limit, order)
