"""OpenAI-compatible routes under /v1 (thin: the logic lives in openai_serving)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from . import embeddings, openai_serving
from .protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
                       EmbeddingRequest, EmbeddingResponse, ModelCard, ModelList, OpenAIError)
from .context import ServerContext
from .limits import check_request
from .params import reject_invalid_text

router = APIRouter(tags=["OpenAI"])

_ERRORS = {code: {"model": OpenAIError} for code in (400, 401, 404, 429, 500, 503)}


async def get_ctx(request: Request) -> ServerContext:
    # async: a plain def would hop to a worker thread on every request
    return request.app.state.ctx


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           ctx: ServerContext = Depends(get_ctx)) -> Response:
    """Chat completion, streamed as ``chat.completion.chunk`` events when ``stream`` is true."""
    reject_invalid_text(body)
    check_request(ctx, body, "chat_completions")
    return await openai_serving.create_chat_completion(ctx, body, request)


@router.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS)
async def completions(body: CompletionRequest, request: Request, ctx: ServerContext = Depends(get_ctx)) -> Response:
    """Text completion of a prompt (string, strings or token ids)."""
    reject_invalid_text(body)
    check_request(ctx, body, "completions")
    return await openai_serving.create_completion(ctx, body, request)


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=_ERRORS)
async def create_embeddings(body: EmbeddingRequest, ctx: ServerContext = Depends(get_ctx)) -> EmbeddingResponse:
    """Embeddings of a string, strings, token ids or lists of them, by the server's embedding model."""
    return await embeddings.create_embeddings(ctx, body)


@router.get("/v1/models", response_model=ModelList, responses=_ERRORS)
async def models(ctx: ServerContext = Depends(get_ctx)) -> ModelList:
    """The served models: the generation model, then the embedding model."""
    return openai_serving.list_models(ctx)


@router.get("/v1/models/{model:path}", response_model=ModelCard, responses=_ERRORS)
async def model(model: str, ctx: ServerContext = Depends(get_ctx)) -> ModelCard:
    """The served model's card; 404 for any other name."""
    return openai_serving.retrieve_model(ctx, model)

