"""The OpenAI routes' logic: chat completions, completions and models, streamed or not.

Shapes follow openai-python's types: one id for every chunk of a stream, ``role`` only in the first
delta of each choice, ``finish_reason`` only ``stop``, ``length`` or ``tool_calls``, a usage chunk with
``choices: []`` when ``stream_options.include_usage`` is set, then ``data: [DONE]``. An error after the
stream started is sent as ``data: {"error": {...}}`` and the stream ends there. Tool calls (tools.py) and
structured output (guided.py) come as OpenAI sends them: ``message.tool_calls`` with ``content: null``,
streamed as tool-call deltas with ``index`` on each and ``id``/``type``/``name`` on the first of each call.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, AsyncIterator, Optional

from starlette.requests import Request
from starlette.responses import Response

from tgi_nb.engine.outputs import ResultAccumulator, TokenLogprob
from tgi_nb.engine.interface import GenerationEngine

from .errors import APIError, BadRequest, NotFound
from .guided import compile_guide, request_guide
from .protocol import (ChatChoice, ChatChoiceLogprobs, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChatDelta, ChatResponseMessage, ChatTokenLogprob, ChatTopLogprob,
                       CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, ModelCard,
                       ModelList, UsageInfo, ignored_fields)
from .context import ServerContext
from .generation import ChatRun, error_kind, internal_error, sampling_params, start_chat, usage_info
from .params import log_ignored, new_id, resolve_max_new_tokens, tokenize
from .streaming import (KEEP_ALIVE, SSE_DONE, SSE_KEEP_ALIVE, ClientDisconnected, GenerationStream, SSEResponse,
                        check_finished, sse)
from .tokens import TokenTable, cumulative_logprob, token_table


SYSTEM_FINGERPRINT = "tgi_nb"

# Engine field -> what the client called it, for error messages.
_COMPLETION_NAMES = {"max_new_tokens": "max_tokens", "prompt": "prompt"}


def finish_reason(reason: Optional[str], tool_calls: bool = False) -> Optional[str]:
    """The engine's finish reason as OpenAI spells it (``error``/``abort`` never get this far);
    ``tool_calls`` when a sample that ended on its own made tool calls.

    Example:
        >>> finish_reason("stop"), finish_reason(None), finish_reason("stop", tool_calls=True)
        ('stop', None, 'tool_calls')
    """
    if reason is None:
        return None
    if reason == "length":
        return "length"
    return "tool_calls" if tool_calls else "stop"


def _error_event(err: APIError) -> bytes:
    return sse(json.dumps(err.openai_body()))


# ----------------------------------------------------------------------------------------------
# Chat completions
# ----------------------------------------------------------------------------------------------

def _reject_unsupported_chat(req: ChatCompletionRequest) -> None:
    if req.top_logprobs is not None and not req.logprobs:
        raise BadRequest("top_logprobs: requires logprobs=true", param="top_logprobs")


def chat_logprobs(table: TokenTable, logprobs: Optional[list[TokenLogprob]]) -> Optional[ChatChoiceLogprobs]:
    """Engine log-probabilities in the chat shape ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    if logprobs is None:
        return None
    return ChatChoiceLogprobs(content=[
        ChatTokenLogprob(token=lp.token, logprob=lp.logprob, bytes=table.bytes(lp.token_id),
                         top_logprobs=[ChatTopLogprob(token=t.token, logprob=t.logprob,
                                                      bytes=table.bytes(t.token_id)) for t in lp.top])
        for lp in logprobs])


async def create_chat_completion(ctx: ServerContext, req: ChatCompletionRequest, request: Request) -> Response:
    """POST /v1/chat/completions."""
    log_ignored("/v1/chat/completions", ignored_fields(req))
    _reject_unsupported_chat(req)
    run = await start_chat(ctx, req, "chat_completions", new_id("chatcmpl"))
    stream = run.stream
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return SSEResponse(_chat_events(ctx, run, request, req.logprobs, include_usage), on_close=stream.close)
    try:
        outputs = (await stream.collect(request))[0]
        acc = ResultAccumulator(run.request_id, req.n)
        parsers = [run.parser() for _ in range(req.n)]
        for out in outputs:
            check_finished(out)
            acc.add(out)
            for d in out.outputs:
                parsers[d.index].feed(d.text, len(d.token_ids), d.finish_reason is not None)
        result = acc.result()
        choices = []
        for o in result.outputs:
            parser = parsers[o.index]
            reasoning = parser.reasoning or None
            message = ChatResponseMessage(content=parser.content, tool_calls=parser.tool_calls or None,
                                          reasoning_content=reasoning, reasoning=reasoning)
            choices.append(ChatChoice(index=o.index, message=message,
                                      logprobs=chat_logprobs(run.table, o.logprobs or []) if req.logprobs else None,
                                      finish_reason=finish_reason(o.finish_reason, bool(parser.tool_calls))))
        thinking = sum(p.reasoning_tokens for p in parsers) if run.reasoning is not None else None
        response = ChatCompletionResponse(id=run.request_id, model=ctx.served_model_name, choices=choices,
                                          usage=usage_info(len(run.prompt_ids), result.completion_tokens,
                                                           result.num_cached_tokens, thinking),
                                          system_fingerprint=SYSTEM_FINGERPRINT)
        stream.succeed()
        return Response(response.model_dump_json(), media_type="application/json")
    except ClientDisconnected:
        return Response(status_code=499)
    except APIError as err:
        stream.fail(error_kind(err))
        raise
    finally:
        stream.close()


async def _chat_events(ctx: ServerContext, run: ChatRun, request: Request, want_logprobs: bool,
                       include_usage: bool) -> AsyncIterator[bytes]:
    created = int(time.time())
    model = ctx.served_model_name
    stream, n = run.stream, run.n
    parsers = [run.parser() for _ in range(n)]

    def chunk(choices: list[ChatChunkChoice], usage: Optional[UsageInfo] = None) -> bytes:
        return sse(ChatCompletionChunk(id=run.request_id, created=created, model=model, choices=choices,
                                       system_fingerprint=SYSTEM_FINGERPRINT, usage=usage).model_dump_json())

    stream.watch_disconnect(request)
    try:
        # Sent before the first token: the client sees the stream open at once, and role appears once.
        # A forced tool call has no content: OpenAI's first delta then carries none either.
        first = ChatDelta(role="assistant", content=None if run.tools.forced else "")
        for index in range(n):
            yield chunk([ChatChunkChoice(index=index, delta=first)])
        cached = 0
        async for event in stream.events(keep_alive=ctx.settings.keep_alive_interval):
            if event is KEEP_ALIVE:
                yield SSE_KEEP_ALIVE
                continue
            _, out = event
            check_finished(out)
            cached = out.num_cached_tokens
            for d in out.outputs:
                logprobs = chat_logprobs(run.table, d.logprobs) if want_logprobs and d.logprobs else None
                parser = parsers[d.index]
                piece = parser.feed(d.text, len(d.token_ids), d.finish_reason is not None)
                if not piece and d.finish_reason is None and logprobs is None:
                    continue
                calls = piece.tool_calls
                delta = ChatDelta(content=piece.content if (piece.content or (logprobs and not calls)) else None,
                                  tool_calls=calls or None, reasoning_content=piece.reasoning or None,
                                  reasoning=piece.reasoning or None)
                yield chunk([ChatChunkChoice(index=d.index, delta=delta, logprobs=logprobs,
                                             finish_reason=finish_reason(d.finish_reason, bool(parser.tool_calls)))])
        if include_usage:
            thinking = sum(p.reasoning_tokens for p in parsers) if run.reasoning is not None else None
            yield chunk([], usage=usage_info(stream.prompt_lens[0], stream.generated[0], cached, thinking))
        yield SSE_DONE
        stream.succeed()
    except ClientDisconnected:
        return
    except APIError as err:
        stream.fail(error_kind(err))
        yield _error_event(err)
    except Exception as exc:  # noqa: BLE001 - the client must learn the stream failed, in OpenAI's shape
        stream.fail("internal")
        yield _error_event(internal_error(exc))


# ----------------------------------------------------------------------------------------------
# Completions
# ----------------------------------------------------------------------------------------------

def _completion_prompts(engine: GenerationEngine, prompt: Any, with_text: bool) -> list[tuple[list[int], Optional[str]]]:
    """(token ids, text) of each prompt: a string, strings, token ids or lists of token ids. Token-id
    prompts are decoded only ``with_text`` (the text is needed for ``echo`` alone); else their text is None."""
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif not prompt:
        raise BadRequest("prompt: must not be empty", param="prompt")
    elif all(isinstance(p, int) for p in prompt):
        items = [list(prompt)]
    else:
        items = list(prompt)
    out = []
    for item in items:
        ids = tokenize(engine, item, "prompt", add_special_tokens=isinstance(item, str))
        text = item if isinstance(item, str) else engine.tokenizer.decode(ids) if with_text else None
        out.append((ids, text))
    return out


class _CompletionLogprobBuilder:
    """Completions' logprobs (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``) per choice."""

    def __init__(self, table: TokenTable, offset: int):
        self.table = table
        self.offset = offset

    def build(self, logprobs: list[Optional[TokenLogprob]], token_ids: Optional[list[int]] = None
              ) -> CompletionLogprobs:
        """The entries for ``logprobs``; a None entry (the first prompt token under ``echo``, which nothing
        scores) gets token ``token_ids[i]`` with null log-probabilities, as OpenAI's and vLLM's echo do."""
        out = CompletionLogprobs()
        for i, lp in enumerate(logprobs):
            if lp is None:
                text = self.table.text(token_ids[i])
                out.tokens.append(text)
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                out.text_offset.append(self.offset)
                self.offset += len(text)
                continue
            text = lp.token
            out.tokens.append(text)
            out.token_logprobs.append(lp.logprob)
            top: dict[str, float] = {}
            for t in lp.top:
                top.setdefault(t.token, t.logprob)
            out.top_logprobs.append(top)
            out.text_offset.append(self.offset)
            self.offset += len(text)
        return out


async def create_completion(ctx: ServerContext, req: CompletionRequest, request: Request) -> Response:
    """POST /v1/completions."""
    log_ignored("/v1/completions", ignored_fields(req))
    if req.suffix is not None:
        raise BadRequest("suffix: not supported; this server has no fill-in-the-middle mode (send the whole "
                         "prompt instead)", param="suffix")
    best_of = req.best_of or req.n
    if best_of < req.n:
        raise BadRequest(f"best_of: must be >= n ({req.n}), got {best_of}", param="best_of")
    if req.stream and best_of > req.n:
        raise BadRequest("best_of: cannot be larger than n when streaming", param="best_of")
    spec = request_guide(req)
    engine = ctx.require_engine()
    prompts = _completion_prompts(engine, req.prompt, with_text=req.echo)
    limits = ctx.limits(engine)
    guide = await compile_guide(engine, spec) if spec is not None else None
    # Scoring best_of candidates needs each token's log-probability even if the client asked for none.
    engine_logprobs = req.logprobs if req.logprobs is not None else (0 if best_of > req.n else None)
    params = [sampling_params(req, engine, resolve_max_new_tokens(req.max_tokens, len(ids), limits, field="max_tokens",
                                                            prompt_field="prompt"),
                        engine_logprobs, best_of, _COMPLETION_NAMES, guide.processor if guide is not None else None,
                        defaults=ctx.sampling_defaults(engine))
              for ids, _ in prompts]
    if req.echo and req.logprobs is not None:   # score the prompt too (lm-eval's loglikelihood does this)
        params = [dataclasses.replace(p, prompt_logprobs=req.logprobs) for p in params]
    request_id = new_id("cmpl")
    stream = GenerationStream(ctx, engine, "completions")
    stream.submit([ids for ids, _ in prompts], params, request_id, _COMPLETION_NAMES)
    table = token_table(engine)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = _completion_events(ctx, stream, request, request_id, req, prompts, include_usage, table)
        return SSEResponse(events, on_close=stream.close)
    try:
        all_outputs = await stream.collect(request)
        choices, completion_tokens, cached = [], 0, 0
        for p, outputs in enumerate(all_outputs):
            acc = ResultAccumulator(stream.request_ids[p], best_of)
            for out in outputs:
                check_finished(out)
                acc.add(out)
            result = acc.result()
            completion_tokens += result.completion_tokens
            cached += result.num_cached_tokens
            samples = result.outputs
            if best_of > req.n:
                samples = sorted(samples, key=lambda o: cumulative_logprob(o.logprobs), reverse=True)[:req.n]
            prompt_text = prompts[p][1]
            for j, o in enumerate(samples):
                logprobs = None
                if req.logprobs is not None:
                    builder = _CompletionLogprobBuilder(table, 0)
                    echoed = builder.build(result.prompt_logprobs or [], prompts[p][0]) if req.echo else None
                    logprobs = builder.build(o.logprobs or [])
                    if echoed is not None:
                        logprobs = CompletionLogprobs(
                            text_offset=echoed.text_offset + logprobs.text_offset,
                            token_logprobs=echoed.token_logprobs + logprobs.token_logprobs,
                            tokens=echoed.tokens + logprobs.tokens,
                            top_logprobs=echoed.top_logprobs + logprobs.top_logprobs)
                choices.append(CompletionChoice(index=p * req.n + j,
                                                text=(prompt_text + o.text) if req.echo else o.text,
                                                logprobs=logprobs, finish_reason=finish_reason(o.finish_reason)))
        prompt_tokens = sum(stream.prompt_lens)
        response = CompletionResponse(id=request_id, model=ctx.served_model_name, choices=choices,
                                      usage=usage_info(prompt_tokens, completion_tokens, cached),
                                      system_fingerprint=SYSTEM_FINGERPRINT)
        stream.succeed()
        return Response(response.model_dump_json(), media_type="application/json")
    except ClientDisconnected:
        return Response(status_code=499)
    except APIError as err:
        stream.fail(error_kind(err))
        raise
    finally:
        stream.close()


async def _completion_events(ctx: ServerContext, stream: GenerationStream, request: Request, request_id: str,
                             req: CompletionRequest, prompts: list[tuple[list[int], Optional[str]]],
                             include_usage: bool, table: TokenTable) -> AsyncIterator[bytes]:
    created = int(time.time())
    model = ctx.served_model_name
    n = req.n
    builders = {p * n + j: _CompletionLogprobBuilder(table, 0) for p in range(len(prompts)) for j in range(n)}

    def chunk(choices: list[CompletionChoice], usage: Optional[UsageInfo] = None) -> bytes:
        return sse(CompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=usage,
                                      system_fingerprint=SYSTEM_FINGERPRINT).model_dump_json())

    stream.watch_disconnect(request)
    try:
        # With logprobs the echoed prompt carries its own, which exist once the prompt is computed: it goes
        # out just before the prompt's first generated text then.
        echo_later = set(range(len(prompts))) if req.echo and req.logprobs is not None else set()
        if req.echo and not echo_later:
            for p, (_, text) in enumerate(prompts):
                for j in range(n):
                    yield chunk([CompletionChoice(index=p * n + j, text=text)])
        cached = 0
        async for event in stream.events(keep_alive=ctx.settings.keep_alive_interval):
            if event is KEEP_ALIVE:
                yield SSE_KEEP_ALIVE
                continue
            p, out = event
            check_finished(out)
            if p in echo_later:
                echo_later.discard(p)
                ids, text = prompts[p]
                for j in range(n):
                    logprobs = builders[p * n + j].build(out.prompt_logprobs or [None] * len(ids), ids)
                    yield chunk([CompletionChoice(index=p * n + j, text=text, logprobs=logprobs)])
            cached += out.num_cached_tokens if out.finished else 0
            for d in out.outputs:
                index = p * n + d.index
                logprobs = builders[index].build(d.logprobs) if req.logprobs is not None and d.logprobs else None
                if not d.text and d.finish_reason is None and logprobs is None:
                    continue
                yield chunk([CompletionChoice(index=index, text=d.text, logprobs=logprobs,
                                              finish_reason=finish_reason(d.finish_reason))])
        if include_usage:
            prompt_tokens, completion_tokens = sum(stream.prompt_lens), sum(stream.generated)
            yield chunk([], usage=usage_info(prompt_tokens, completion_tokens, cached))
        yield SSE_DONE
        stream.succeed()
    except ClientDisconnected:
        return
    except APIError as err:
        stream.fail(error_kind(err))
        yield _error_event(err)
    except Exception as exc:  # noqa: BLE001
        stream.fail("internal")
        yield _error_event(internal_error(exc))


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------

def _model_card(ctx: ServerContext) -> ModelCard:
    engine = ctx.loaded_engine
    return ModelCard(id=ctx.served_model_name, created=ctx.started,
                     root=(engine.model_id if engine is not None else ctx.settings.model_id),
                     max_model_len=ctx.limits(engine).max_total_tokens if engine is not None else
                     ctx.settings.max_total_tokens)


def list_models(ctx: ServerContext) -> ModelList:
    """GET /v1/models: the generation model and the embedding model (known before either finished loading)."""
    cards = [_model_card(ctx)]
    if ctx.embeddings is not None:
        cards.append(_embedding_card(ctx))
    return ModelList(data=cards)


def retrieve_model(ctx: ServerContext, model: str) -> ModelCard:
    """GET /v1/models/{model}: the card, or 404 for any other name."""
    card = _model_card(ctx)
    if ctx.embeddings is not None and model == ctx.embedding_model_name:
        return _embedding_card(ctx)
    if model not in {card.id, card.root}:
        raise NotFound(f"The model '{model}' does not exist; this server serves '{card.id}'", param="model",
                       code="model_not_found")
    return card


def _embedding_card(ctx: ServerContext) -> ModelCard:
    engine = ctx.embeddings.engine
    return ModelCard(id=ctx.embedding_model_name, created=ctx.started, root=ctx.embedding_model_name,
                     max_model_len=engine.max_input_tokens if engine is not None else None)
