"""POST /v1/embeddings: OpenAI's Embeddings API on the server's sentence-transformers model.

The embedding model loads on the first request (the request waits for it, asynchronously), so a server that
never embeds never pays for it. Text is tokenized off the event loop, checked against the model's input
length, then embedded by :class:`~tgi_nb.engine.EmbeddingEngine`'s batching thread; the route awaits the
result without blocking the loop. ``encoding_format="base64"`` (openai-python's default) returns
little-endian float32 bytes, as OpenAI does.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any, Optional

from tgi_nb.engine import ValidationError

from .errors import BadRequest, ContextLengthExceeded, NotFound
from .protocol import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage, ignored_fields
from .params import log_ignored
from .context import ServerContext

# OpenAI's own limit on inputs per request.
MAX_INPUTS = 2048
# How long a request waits for the embedding model to load before a 503.
LOAD_TIMEOUT = 300.0


def parse_input(value: Any) -> tuple[list[Any], bool]:
    """``input`` as a list of strings (``True``) or of token-id lists (``False``); BadRequest otherwise.

    Example:
        >>> parse_input("hi"), parse_input([1, 2]), parse_input([[1], [2, 3]])
        ((['hi'], True), ([[1, 2]], False), ([[1], [2, 3]], False))
        >>> parse_input(["a", ""])
        Traceback (most recent call last):
        ...
        tgi_nb.server.errors.BadRequest: input[1]: must be a non-empty string
    """
    allowed = "a string, a list of strings, a list of token ids or a list of token-id lists"
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise BadRequest(f"input: must be {allowed} (not empty), got {_short(value)}", param="input")
    if len(value) > MAX_INPUTS:
        raise BadRequest(f"input: at most {MAX_INPUTS} inputs per request, got {len(value)}", param="input")
    if all(_is_token(t) for t in value):
        return [value], False
    if all(isinstance(v, str) for v in value):
        for i, text in enumerate(value):
            if not text:
                raise BadRequest(f"input[{i}]: must be a non-empty string", param="input")
        return value, True
    if all(isinstance(v, list) for v in value):
        for i, ids in enumerate(value):
            if not ids or not all(_is_token(t) for t in ids):
                raise BadRequest(f"input[{i}]: must be a non-empty list of token ids (integers), got {_short(ids)}",
                                 param="input")
        return value, False
    raise BadRequest(f"input: must be {allowed}, not a mix, got {_short(value)}", param="input")


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


async def embedding_engine(ctx: ServerContext) -> Any:
    """The loaded embedding engine, loading it first if needed (awaited in a worker thread)."""
    holder = ctx.embeddings
    if holder is None:
        raise NotFound("This server serves no embedding model (it was started with --embedding-model none); "
                       "restart it with EMBEDDING_MODEL set to a sentence-transformers model",
                       param="model", code="model_not_found")
    if holder.engine is None and holder.status in ("idle", "loading"):
        holder.start()
        await asyncio.to_thread(holder.wait, LOAD_TIMEOUT)
    return holder.get()


def _token_ids(engine: Any, inputs: list[Any], is_text: bool, truncate: Optional[int]) -> list[list[int]]:
    limit = engine.max_input_tokens if truncate in (None, -1) else min(truncate, engine.max_input_tokens)
    if is_text:
        ids = engine.tokenize(inputs, truncate=False)
        if truncate is not None:
            # Re-tokenized with the tokenizer's own truncation, so the special tokens stay at both ends.
            long = [i for i, row in enumerate(ids) if len(row) > limit]
            if long:
                cut = engine.tokenizer([inputs[i] for i in long], add_special_tokens=True, truncation=True,
                                       max_length=limit)["input_ids"]
                for i, row in zip(long, cut):
                    ids[i] = list(row)
        return ids
    vocab = len(engine.tokenizer)
    for i, row in enumerate(inputs):
        bad = next((t for t in row if not 0 <= t < vocab), None)
        if bad is not None:
            raise BadRequest(f"input[{i}]: token id {bad} is outside the vocabulary [0, {vocab})", param="input")
    return [row[:limit] for row in inputs] if truncate is not None else inputs


async def create_embeddings(ctx: ServerContext, req: EmbeddingRequest) -> EmbeddingResponse:
    """POST /v1/embeddings."""
    log_ignored("/v1/embeddings", ignored_fields(req))
    inputs, is_text = parse_input(req.input)
    if req.truncate_prompt_tokens == 0:   # would cut every input to nothing
        raise BadRequest("truncate_prompt_tokens: must be -1 (the model's maximum) or >= 1, got 0",
                         param="truncate_prompt_tokens")
    engine = await embedding_engine(ctx)
    try:
        engine.check_dimensions(req.dimensions)
    except ValidationError as exc:
        raise BadRequest(str(exc), param="dimensions") from exc
    ids = await asyncio.to_thread(_token_ids, engine, inputs, is_text, req.truncate_prompt_tokens)
    for i, row in enumerate(ids):
        if len(row) > engine.max_input_tokens:
            raise ContextLengthExceeded(
                f"input[{i}] has {len(row)} tokens, more than {engine.model_id}'s maximum of "
                f"{engine.max_input_tokens}; shorten it, or send truncate_prompt_tokens=-1 to cut it there",
                param="input")

    route, metrics = "embeddings", ctx.metrics
    ctx.acquire_slot(route)
    metrics.request_count.labels(route=route).inc()
    arrival = time.perf_counter()
    future = None
    try:
        try:
            future = engine.submit(ids, req.dimensions)
        except ValidationError as exc:   # an input with no token left: the client's, a 400
            raise BadRequest(str(exc), param=exc.field) from exc
        vectors = await asyncio.wrap_future(future)
    except BaseException as exc:
        if future is not None:
            future.cancel()  # a client that left frees its place in the batch queue
        metrics.request_failure.labels(route=route, err=type(exc).__name__).inc()
        raise
    finally:
        ctx.release_slot()
    metrics.request_success.labels(route=route).inc()
    metrics.request_duration.labels(route=route).observe(time.perf_counter() - arrival)

    if req.encoding_format == "base64":
        little_endian = vectors.astype("<f4", copy=False)
        data = [Embedding(index=i, embedding=base64.b64encode(row.tobytes()).decode("ascii"))
                for i, row in enumerate(little_endian)]
    else:
        data = [Embedding(index=i, embedding=row) for i, row in enumerate(vectors.tolist())]
    tokens = sum(len(row) for row in ids)
    return EmbeddingResponse(data=data, model=ctx.embedding_model_name,
                             usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
