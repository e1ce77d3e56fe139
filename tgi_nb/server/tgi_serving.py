"""TGI's own routes: /generate, /generate_stream, / (either), /tokenize, /detokenize, /chat_tokenize.

Request and response shapes are TGI's, so ``huggingface_hub.InferenceClient.text_generation`` (which posts
to the endpoint's root) and TGI's own clients work unchanged. Errors use TGI's ``{"error", "error_type"}``
and status codes (422 validation, 424 generation, 429 overloaded, 503 not ready).
"""

from __future__ import annotations

import json
import logging
import random
import time
from typing import Any, AsyncIterator, Optional

from starlette.requests import Request
from starlette.responses import Response

from tgi_nb.engine.outputs import CompletionResult, ResultAccumulator
from tgi_nb.engine.interface import GenerationEngine

from .chat import render_chat, render_chat_request
from .errors import APIError, BadRequest, logged_failure
from .limits import check_stop
from .guided import compile_guide, grammar_from_format
from .protocol import (BestOfSequence, ChatCompletionRequest, ChatTokenizeResponse, DetokenizeRequest,
                       DetokenizeResponse, GenerateDetails, GenerateParameters, GenerateRequest, GenerateResponse,
                       PrefillToken, SimpleToken, StreamDetails, StreamResponse, TGIToken, TokenizeRequest,
                       VLLMTokenizeResponse, ignored_fields)
from .context import ServerContext
from .params import log_ignored, make_sampling_params, resolve_max_new_tokens, tokenize
from .streaming import (KEEP_ALIVE, SSE_KEEP_ALIVE, ClientDisconnected, GenerationStream, SSEResponse, check_finished,
                        sse)
from .tokens import TokenTable, cumulative_logprob, token_table
from .tools import plan_tools

logger = logging.getLogger("tgi_nb.server")

_NAMES = {"max_new_tokens": "max_new_tokens", "prompt": "inputs", "n": "best_of", "logprobs": "top_n_tokens"}


def tgi_finish_reason(result: Any) -> str:
    """``length``, ``eos_token`` or ``stop_sequence``, as TGI reports why a sequence ended.

    Example:
        >>> from tgi_nb.engine.outputs import CompletionDelta
        >>> tgi_finish_reason(CompletionDelta(0, "", [], finish_reason="stop", stop_reason="\\n"))
        'stop_sequence'
    """
    if result.finish_reason == "length":
        return "length"
    return "stop_sequence" if isinstance(result.stop_reason, str) else "eos_token"


async def _prepare(ctx: ServerContext, req: GenerateRequest, *, stream: bool):
    """Validate TGI parameters; return (engine, prompt ids, SamplingParams, seed)."""
    log_ignored("/generate", ignored_fields(req) + [f"parameters.{f}" for f in ignored_fields(req.parameters)])
    p: GenerateParameters = req.parameters
    s = ctx.settings
    best_of = p.best_of or 1
    spec = grammar_from_format(p.grammar, "grammar", allow_text=False)
    if best_of > s.max_best_of:
        raise BadRequest(f"`best_of` must be > 0 and <= {s.max_best_of}. Given: {best_of}", param="best_of")
    if stream and best_of != 1:
        raise BadRequest("`best_of` != 1 is not supported when streaming tokens", param="best_of")
    if stream and p.decoder_input_details:
        raise BadRequest("`decoder_input_details` == true is not supported when streaming tokens",
                         param="decoder_input_details")
    top_n = p.top_n_tokens or 0
    if top_n > s.max_top_n_tokens:
        raise BadRequest(f"`top_n_tokens` must be >= 0 and <= {s.max_top_n_tokens}. Given: {top_n}",
                         param="top_n_tokens")
    if len(p.stop) > s.max_stop_sequences:
        raise BadRequest(f"`stop` supports up to {s.max_stop_sequences} stop sequences. Given: {len(p.stop)}",
                         param="stop")
    check_stop(s.max_stop_sequences, p.stop, "stop")   # and the length of each
    # As TGI: any warper (temperature, top_k, top_p) turns sampling on even without do_sample.
    sampling = (p.do_sample or (p.temperature not in (None, 1.0)) or bool(p.top_k)
                or (p.top_p not in (None, 1.0)))
    if best_of > 1 and not sampling:
        raise BadRequest("you must use sampling when `best_of` is > 1", param="best_of")
    if best_of > 1 and p.seed is not None:
        raise BadRequest("`seed` must not be set when `best_of` > 1", param="seed")
    for name in ("typical_p", "watermark", "adapter_id"):
        if getattr(p, name) not in (None, False):
            logger.warning("/generate: ignoring parameters.%s=%r (not supported by this engine)", name,
                           getattr(p, name))
    if not req.inputs:
        raise BadRequest("`inputs` cannot be empty", param="inputs")
    engine = ctx.require_engine()
    ids = tokenize(engine, req.inputs, "inputs", add_special_tokens=True)
    if p.truncate is not None:
        ids = ids[-p.truncate:]
    max_new = resolve_max_new_tokens(p.max_new_tokens, len(ids), ctx.limits(engine), field="max_new_tokens",
                                     prompt_field="inputs")
    guide = await compile_guide(engine, spec) if spec is not None else None
    # A seed is drawn here (not in the engine) so that details.seed can tell the client how to reproduce.
    seed = (p.seed if p.seed is not None else random.getrandbits(63)) if sampling else None
    params = make_sampling_params(
        _NAMES, max_new_tokens=max_new, do_sample=sampling,
        temperature=(p.temperature or 1.0) if sampling else 0.0, top_k=p.top_k or 0, top_p=p.top_p or 1.0,
        repetition_penalty=p.repetition_penalty or 1.0, frequency_penalty=p.frequency_penalty or 0.0,
        seed=seed, stop=list(p.stop), logprobs=top_n, n=best_of,
        prompt_logprobs=0 if p.decoder_input_details else None,
        logits_processor_factory=guide.processor if guide is not None else None)
    return engine, ids, params, seed


def _token(table: TokenTable, token_id: int, logprob: Optional[float], text: Optional[str] = None) -> TGIToken:
    return TGIToken(id=token_id, text=table.text(token_id) if text is None else text, logprob=logprob,
                    special=table.is_special(token_id))


def _tokens(table: TokenTable, result: CompletionResult) -> list[TGIToken]:
    logprobs = result.logprobs or []
    return [_token(table, t, logprobs[k].logprob, logprobs[k].token) if k < len(logprobs) else _token(table, t, None)
            for k, t in enumerate(result.token_ids)]


def _top_tokens(table: TokenTable, result: CompletionResult) -> list[list[TGIToken]]:
    return [[_token(table, t.token_id, t.logprob, t.token) for t in lp.top] for lp in result.logprobs or []]


def _compute_type(engine: GenerationEngine) -> str:
    return engine.config.device


def _headers(stream: GenerationStream, generated: int) -> dict[str, str]:
    total = time.perf_counter() - stream.arrival
    return {"x-compute-type": _compute_type(stream.engine),
            "x-compute-time": f"{total:.6f}", "x-total-time": str(int(total * 1000)),
            "x-prompt-tokens": str(stream.prompt_lens[0]), "x-generated-tokens": str(generated)}


async def generate(ctx: ServerContext, req: GenerateRequest, request: Request, *, wrap_in_list: bool = False
                   ) -> Response:
    """POST /generate (and POST / without ``stream``, whose answer TGI wraps in a list)."""
    engine, ids, params, seed = await _prepare(ctx, req, stream=False)
    p = req.parameters
    stream = GenerationStream(ctx, engine, "generate")
    try:
        stream.submit([ids], params, f"generate-{id(stream):x}-{time.monotonic_ns()}", _NAMES)
        outputs = (await stream.collect(request))[0]
        acc = ResultAccumulator(stream.request_ids[0], params.n)
        for out in outputs:
            check_finished(out)
            acc.add(out)
        result = acc.result()
        samples = result.outputs
        best = max(samples, key=lambda o: cumulative_logprob(o.logprobs))
        table = token_table(engine)
        prefix = req.inputs if p.return_full_text else ""
        details = None
        if p.details or p.decoder_input_details:
            scored = result.prompt_logprobs or [None] * len(ids)
            prefill = ([PrefillToken(id=t, text=table.text(t) if lp is None else lp.token,
                                     logprob=lp.logprob if lp is not None else None)
                        for t, lp in zip(ids, scored)] if p.decoder_input_details else [])
            top_n = bool(p.top_n_tokens)

            def seed_of(o: CompletionResult) -> Optional[int]:
                return None if seed is None else seed + o.index

            others = [BestOfSequence(generated_text=prefix + o.text, finish_reason=tgi_finish_reason(o),
                                     generated_tokens=len(o.token_ids), seed=seed_of(o), prefill=prefill,
                                     tokens=_tokens(table, o), top_tokens=_top_tokens(table, o) if top_n else None)
                      for o in samples if o is not best]
            details = GenerateDetails(finish_reason=tgi_finish_reason(best), generated_tokens=len(best.token_ids),
                                      seed=seed_of(best), prefill=prefill, tokens=_tokens(table, best),
                                      top_tokens=_top_tokens(table, best) if top_n else None,
                                      best_of_sequences=others or None)
        body = GenerateResponse(generated_text=prefix + best.text, details=details)
        stream.succeed()
        payload = body.model_dump_json()
        if wrap_in_list:
            payload = f"[{payload}]"
        return Response(payload, media_type="application/json", headers=_headers(stream, len(best.token_ids)))
    except ClientDisconnected:
        return Response(status_code=499)
    except APIError as err:
        stream.fail("validation" if err.tgi_status_code == 422 else "generation")
        raise
    finally:
        stream.close()


async def generate_stream(ctx: ServerContext, req: GenerateRequest, request: Request) -> Response:
    """POST /generate_stream (and POST / with ``stream: true``): one SSE event per token."""
    engine, ids, params, seed = await _prepare(ctx, req, stream=True)
    stream = GenerationStream(ctx, engine, "generate_stream")
    stream.submit([ids], params, f"generate-{id(stream):x}-{time.monotonic_ns()}", _NAMES)
    events = _generate_events(ctx, stream, request, req, seed, token_table(engine))
    return SSEResponse(events, on_close=stream.close, headers={"x-compute-type": _compute_type(engine)})


async def _generate_events(ctx: ServerContext, stream: GenerationStream, request: Request, req: GenerateRequest,
                           seed: Optional[int], table: TokenTable) -> AsyncIterator[bytes]:
    p = req.parameters
    index = 0
    texts: list[str] = []
    stream.watch_disconnect(request)
    try:
        async for event in stream.events(keep_alive=ctx.settings.keep_alive_interval):
            if event is KEEP_ALIVE:
                yield SSE_KEEP_ALIVE
                continue
            _, out = event
            check_finished(out)
            for d in out.outputs:
                # The engine emits one token per step; the text attached is what became final with it,
                # so the tokens' texts always add up to generated_text (stop strings never leak).
                texts.append(d.text)
                for k, token_id in enumerate(d.token_ids):
                    index += 1
                    last = d.finish_reason is not None and k == len(d.token_ids) - 1
                    lp = d.logprobs[k] if d.logprobs and k < len(d.logprobs) else None
                    token = _token(table, token_id, lp.logprob if lp else None,
                                   text=d.text if k == len(d.token_ids) - 1 else "")
                    top = ([_token(table, t.token_id, t.logprob, t.token) for t in lp.top]
                           if p.top_n_tokens and lp else None)
                    generated_text = details = None
                    if last:
                        generated_text = (req.inputs if p.return_full_text else "") + "".join(texts)
                        if p.details:
                            details = StreamDetails(finish_reason=tgi_finish_reason(d),
                                                    generated_tokens=stream.generated[0], seed=seed,
                                                    input_length=stream.prompt_lens[0])
                    yield sse(StreamResponse(index=index, token=token, top_tokens=top, generated_text=generated_text,
                                             details=details).model_dump_json())
        stream.succeed()
    except ClientDisconnected:
        return
    except APIError as err:
        stream.fail("generation")
        yield sse(json.dumps(err.tgi_body()))
    except Exception as exc:  # noqa: BLE001 - the client must learn the stream failed
        stream.fail("internal")
        yield sse(json.dumps({"error": logged_failure("generate_stream failed", "internal server error", exc),
                              "error_type": "incomplete_generation"}))


# ----------------------------------------------------------------------------------------------
# Tokenizer routes
# ----------------------------------------------------------------------------------------------

def _simple_tokens(tokenizer: Any, text: str, add_special_tokens: bool, limit: int, param: str) -> list[SimpleToken]:
    # Cut at limit + 1 tokens: a longer text is refused without building an object for each of its tokens.
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True, truncation=True,
                    max_length=limit + 1)
    _check_length(len(enc["input_ids"]), limit, param)
    return [SimpleToken(id=t, text=text[a:b], start=a, stop=b)
            for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])]


def _check_length(count: int, limit: int, param: str) -> None:
    if count > limit:
        raise BadRequest(f"{param}: more than max_input_tokens ({limit}) tokens; nothing longer can be generated "
                         f"from", param=param)


def tokenize_route(ctx: ServerContext, req: TokenizeRequest) -> Any:
    """POST /tokenize: TGI's ``{"inputs"}`` -> ``[{id, text, start, stop}]``; vLLM's ``{"prompt"}`` or
    ``{"messages"}`` -> ``{count, max_model_len, tokens, token_strs}``."""
    log_ignored("/tokenize", ignored_fields(req))
    engine = ctx.require_engine()
    limit = ctx.limits(engine).max_input_tokens
    if req.inputs is not None:
        # As /generate sees them (special tokens added), which is what TGI's /tokenize reports.
        return [t.model_dump() for t in _simple_tokens(engine.tokenizer, req.inputs, True, limit, "inputs")]
    if req.messages is not None:
        text = render_chat(engine.tokenizer, req.messages, chat_template=ctx.chat_template,
                           add_generation_prompt=req.add_generation_prompt,
                           chat_template_kwargs=req.chat_template_kwargs)
        ids = engine.tokenizer.encode(text, add_special_tokens=False)
    elif req.prompt is not None:
        ids = (engine.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
               if isinstance(req.prompt, str) else tokenize(engine, req.prompt, "prompt"))
    else:
        raise BadRequest("inputs: one of inputs, prompt or messages is required", param="inputs")
    _check_length(len(ids), limit, "prompt" if req.messages is None else "messages")
    return VLLMTokenizeResponse(count=len(ids), max_model_len=ctx.limits(engine).max_total_tokens, tokens=ids,
                                token_strs=engine.tokenizer.convert_ids_to_tokens(ids)).model_dump()


def detokenize_route(ctx: ServerContext, req: DetokenizeRequest) -> DetokenizeResponse:
    """POST /detokenize: ``{"tokens": [...]}`` -> ``{"prompt": text}``."""
    engine = ctx.require_engine()
    ids = tokenize(engine, req.tokens, "tokens") if req.tokens else []
    return DetokenizeResponse(prompt=engine.tokenizer.decode(ids))


def chat_tokenize_route(ctx: ServerContext, req: ChatCompletionRequest) -> ChatTokenizeResponse:
    """POST /chat_tokenize: the templated prompt of a chat request and its tokens (TGI's route), tools included
    as /v1/chat/completions would show them."""
    engine = ctx.require_engine()
    tools = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls)
    text = render_chat_request(engine.tokenizer, req, tools, ctx.chat_template)
    tokens = _simple_tokens(engine.tokenizer, text, False, ctx.limits(engine).max_input_tokens, "messages")
    return ChatTokenizeResponse(tokenize_response=tokens, templated_text=text)
