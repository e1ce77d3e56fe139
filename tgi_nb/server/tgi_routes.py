"""TGI's routes, plus the tokenizer helpers vLLM also serves (thin: logic in tgi_serving)."""

from __future__ import annotations

from typing import Any, Optional

from fastapi import APIRouter, Depends, Request
from starlette.responses import JSONResponse, Response

from tgi_nb.engine.interface import GenerationEngine
from tgi_nb.models.native import kernel_paths

from . import tgi_serving
from .protocol import (ChatCompletionRequest, ChatTokenizeResponse, DetokenizeRequest, DetokenizeResponse,
                       GenerateRequest, GenerateResponse, Info, StreamResponse, TGIError, TokenizeRequest)
from .context import ServerContext
from .params import reject_invalid_text
from .version import server_version

router = APIRouter(tags=["Text Generation Inference"])

FAILED_TO_LOAD = "the model failed to load; the server's log has the details"

_ERRORS = {code: {"model": TGIError} for code in (401, 422, 424, 429, 500, 503)}


async def get_ctx(request: Request) -> ServerContext:
    # async: a plain def would hop to a worker thread on every request
    return request.app.state.ctx


@router.post("/generate", response_model=GenerateResponse, responses=_ERRORS)
async def generate(body: GenerateRequest, request: Request, ctx: ServerContext = Depends(get_ctx)) -> Response:
    """Generate text for ``inputs``; ``details`` adds tokens, log-probabilities and the finish reason."""
    reject_invalid_text(body)
    return await tgi_serving.generate(ctx, body, request)


@router.post("/generate_stream", responses={200: {"model": StreamResponse, "content": {"text/event-stream": {}}},
                                            **_ERRORS})
async def generate_stream(body: GenerateRequest, request: Request, ctx: ServerContext = Depends(get_ctx)) -> Response:
    """Server-sent events, one per generated token; the last carries ``generated_text``."""
    reject_invalid_text(body)
    return await tgi_serving.generate_stream(ctx, body, request)


@router.post("/", responses=_ERRORS)
async def compat_generate(body: GenerateRequest, request: Request, ctx: ServerContext = Depends(get_ctx)) -> Response:
    """TGI's root route (what ``InferenceClient.text_generation`` calls): /generate_stream when ``stream``
    is true, else /generate with the answer wrapped in a list."""
    reject_invalid_text(body)
    if body.stream:
        return await tgi_serving.generate_stream(ctx, body, request)
    return await tgi_serving.generate(ctx, body, request, wrap_in_list=True)


@router.get("/info", response_model=Info)
async def info(ctx: ServerContext = Depends(get_ctx)) -> Info:
    """Model and router limits, as TGI's /info."""
    s = ctx.settings
    engine = ctx.loaded_engine
    limits = ctx.limits(engine) if engine is not None else None
    return Info(model_id=(engine.model_id if engine is not None else s.model_id) or ctx.served_model_name,
                max_concurrent_requests=s.max_concurrent_requests, max_best_of=s.max_best_of,
                max_stop_sequences=s.max_stop_sequences, max_client_batch_size=s.max_client_batch_size,
                max_input_tokens=limits.max_input_tokens if limits else s.max_input_tokens,
                max_total_tokens=limits.max_total_tokens if limits else s.max_total_tokens,
                version=server_version(), served_model_name=ctx.served_model_name, model_status=ctx.holder.status,
                max_top_n_tokens=s.max_top_n_tokens, generation_config=ctx.sampling_defaults(engine),
                **_capacity_fields(engine))


def _capacity_fields(engine: GenerationEngine) -> dict[str, Any]:
    """/info's memory fields from the engine's capacity plan (an engine without one reports what it has)."""
    config = getattr(engine, "config", None)
    plan = getattr(engine, "capacity", None)
    return dict(max_batch_total_tokens=getattr(config, "max_batch_total_tokens", None),
                weights_bytes=getattr(engine, "weights_bytes", None),
                kv_cache_bytes=plan.kv_cache_bytes if plan is not None else None,
                kv_cache_dtype=getattr(config, "kv_cache_dtype", None),
                num_threads=getattr(config, "num_threads", None),
                capacity_reasons=plan.reasons() if plan is not None else None,
                weight_formats=_weight_formats(engine), numerics=getattr(config, "numerics", None),
                kernels=kernel_paths() if engine is not None else None)


def _weight_formats(engine: GenerationEngine) -> Optional[str]:
    formats = getattr(getattr(engine, "model", None), "weight_formats", None)
    return formats() if callable(formats) else None


@router.get("/health", responses={503: {"model": TGIError}})
@router.get("/", responses={503: {"model": TGIError}}, include_in_schema=False)
async def health(ctx: ServerContext = Depends(get_ctx)) -> Response:
    """200 once the model is loaded; 503 while it loads or if it failed (the body says which). Open to anyone
    even with an API key, so a failure's text (local paths...) stays in the log and the authenticated routes'
    503 errors."""
    holder = ctx.holder
    if holder.status == "ready":
        return Response(status_code=200)
    message = {"loading": "the model is loading", "idle": "the model is not loaded",
               "stopped": "the server is shutting down"}.get(holder.status, FAILED_TO_LOAD)
    return JSONResponse({"error": message, "error_type": "healthcheck", "status": holder.status}, status_code=503)


@router.get("/version")
async def version() -> dict:
    """The server's version (as vLLM's /version)."""
    return {"version": server_version()}


@router.get("/metrics", response_class=Response)
async def metrics(ctx: ServerContext = Depends(get_ctx)) -> Response:
    """Prometheus metrics."""
    body, content_type = ctx.metrics.render()
    return Response(body, media_type=content_type)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, ctx: ServerContext = Depends(get_ctx)):
    """Tokens of ``inputs`` (TGI's shape) or of ``prompt`` / ``messages`` (vLLM's shape)."""
    reject_invalid_text(body)
    return tgi_serving.tokenize_route(ctx, body)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, ctx: ServerContext = Depends(get_ctx)) -> DetokenizeResponse:
    """Text of token ids."""
    return tgi_serving.detokenize_route(ctx, body)


@router.post("/chat_tokenize", response_model=ChatTokenizeResponse)
async def chat_tokenize(body: ChatCompletionRequest, ctx: ServerContext = Depends(get_ctx)) -> ChatTokenizeResponse:
    """The chat template applied to ``messages``, and its tokens."""
    reject_invalid_text(body)
    return tgi_serving.chat_tokenize_route(ctx, body)
