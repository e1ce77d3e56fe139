"""The one chat generation path, shared by /v1/chat/completions and /v1/responses.

:func:`start_chat` takes a chat request to a running engine request: the chat template (with the reasoning
effort mapped to the template's switch), the tools' plan, the grammar for forced calls or a response format
(behind the think block a reasoning model may write first), the sampling parameters, and a
:class:`~tgi_nb.server.streaming.GenerationStream`. Each sample's output then goes through a
:class:`SampleParser`: the reasoning parser first (reasoning.py), then the tool-call parser on the answer
(tool_parser.py). The routes only shape what comes out (openai_serving.py, responses_serving.py).

Example (inside a route):
    run = await start_chat(ctx, req, "chat_completions", new_id("chatcmpl"))
    parser = run.parser()
    async for _, out in run.stream.events():
        for d in out.outputs:
            piece = parser.feed(d.text, len(d.token_ids), d.finish_reason is not None)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from tgi_nb.engine.interface import GenerationEngine

from .chat import render_chat_request
from .context import ServerContext
from .errors import APIError, logged_failure
from .guided import compile_guide, request_guide
from .params import make_sampling_params, parse_logit_bias, resolve_max_new_tokens, stop_list, tokenize
from .protocol import ChatCompletionRequest, CompletionTokensDetails, PromptTokensDetails, UsageInfo
from .reasoning import (ANSWER, MAY_OPEN, THINKING, ReasoningSplitter, answer_text, effort_template_kwargs,
                        reasoning_parser, start_state, think_grammar)
from .streaming import GenerationStream
from .tokens import TokenTable, token_table
from .tool_parser import ToolCallParser
from .tools import NoTagEcho, ToolPlan, follows_tool_results_as_text, plan_tools


# Engine field -> what the client called it, for error messages.
CHAT_NAMES = {"max_new_tokens": "max_tokens", "logprobs": "top_logprobs", "prompt": "messages"}


def sampling_params(req: Any, engine: GenerationEngine, max_new_tokens: int, logprobs: Optional[int], n: int,
                    names: dict[str, str], logits_processor_factory: Any = None,
                    defaults: Optional[dict[str, float]] = None):
    """The engine's ``SamplingParams`` for a chat or completion request (OpenAI's names); a field the request
    leaves out takes the model's recommended value (``defaults``, generation_defaults.py), else OpenAI's."""
    def pick(name: str, neutral: float) -> float:
        value = getattr(req, name)
        return value if value is not None else (defaults or {}).get(name, neutral)

    temperature, top_p, top_k = pick("temperature", 1.0), pick("top_p", 1.0), pick("top_k", 0)
    top_k = 0 if top_k == -1 else top_k
    if top_p == 0:  # OpenAI accepts 0: only the most likely token is left
        top_p, top_k = 1.0, 1
    return make_sampling_params(
        names,
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        min_p=pick("min_p", 0.0), repetition_penalty=pick("repetition_penalty", 1.0),
        frequency_penalty=req.frequency_penalty or 0.0, presence_penalty=req.presence_penalty or 0.0,
        logit_bias=parse_logit_bias(req.logit_bias, engine.vocab_size), seed=req.seed,
        stop=stop_list(req.stop), stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
        logprobs=logprobs, n=n, logits_processor_factory=logits_processor_factory)


def usage_info(prompt_tokens: int, completion_tokens: int, cached: int,
               reasoning_tokens: Optional[int] = None) -> UsageInfo:
    """Usage in the chat shape; ``completion_tokens_details.reasoning_tokens`` when a reasoning parser ran.

    Example:
        >>> usage_info(5, 7, 0, reasoning_tokens=4).completion_tokens_details.reasoning_tokens
        4
    """
    details = CompletionTokensDetails(reasoning_tokens=reasoning_tokens) if reasoning_tokens is not None else None
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
                     completion_tokens_details=details)


def error_kind(err: APIError) -> str:
    """The metrics label of a request that failed with ``err``."""
    return {400: "validation", 429: "overloaded", 503: "unavailable"}.get(err.status_code, "generation")


def internal_error(exc: Exception) -> APIError:
    """An unexpected exception after a stream started, as the 500 the client is sent (and logged)."""
    return APIError(logged_failure("stream failed", "internal server error", exc))   # its text in the log only


# ----------------------------------------------------------------------------------------------
# One sample's output: thinking, then content and tool calls from the answer
# ----------------------------------------------------------------------------------------------

@dataclass(slots=True)
class ParsedDelta:
    """What a piece of output adds: thinking, answer text, tool-call deltas (tool_parser's shape)."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


class SampleParser:
    """One sample's output, fed as it streams (or whole): :class:`~tgi_nb.server.reasoning.ReasoningSplitter`
    when a reasoning parser runs (``state`` not None), then :class:`~tgi_nb.server.tool_parser.ToolCallParser`
    on the answer when ``tool_names`` are parsed. Counts the tokens spent thinking.

    Example:
        >>> p = SampleParser("thinking", None)
        >>> p.feed("Easy.</think>", 3, False), p.feed("4", 1, True)
        (ParsedDelta(reasoning='Easy.', content='', tool_calls=[]), ParsedDelta(reasoning='', content='4', tool_calls=[]))
        >>> p.reasoning, p.content, p.reasoning_tokens
        ('Easy.', '4', 3)
    """

    __slots__ = ("_splitter", "_tools", "reasoning", "_content", "reasoning_tokens")

    def __init__(self, state: Optional[str], tool_names: Optional[list[str]], single_call: bool = False):
        self._splitter = ReasoningSplitter(state) if state is not None else None
        self._tools = ToolCallParser(tool_names, single_call) if tool_names is not None else None
        self.reasoning = ""
        self._content = ""
        self.reasoning_tokens = 0

    def feed(self, text: str, num_tokens: int, finished: bool) -> ParsedDelta:
        """Add a piece of output of ``num_tokens`` tokens; ``finished`` flushes what was held back."""
        splitter = self._splitter
        if splitter is None:
            reasoning, answer = "", text
        else:
            # A piece that opens, continues or closes the block is thinking (tags count as thinking).
            was_thinking = splitter.thinking
            reasoning, answer = splitter.feed(text)
            if was_thinking or splitter.thinking:
                self.reasoning_tokens += num_tokens
            if finished:
                more_reasoning, more_answer = splitter.finish()
                reasoning, answer = reasoning + more_reasoning, answer + more_answer
        out = ParsedDelta(reasoning=reasoning)
        if self._tools is None:
            out.content = answer
        else:
            out.content, out.tool_calls = self._tools.feed(answer)
            if finished:
                more_content, more_calls = self._tools.finish()
                out.content += more_content
                out.tool_calls += more_calls
        self.reasoning += out.reasoning
        self._content += out.content
        return out

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """The calls made so far, whole (``id``, ``type``, ``function: {name, arguments}``)."""
        return self._tools.calls if self._tools is not None else []

    @property
    def content(self) -> Optional[str]:
        """The answer's text: None when the sample made tool calls and wrote nothing else (OpenAI's shape)."""
        if self.tool_calls and not self._content:
            return None
        return self._content


# ----------------------------------------------------------------------------------------------
# Starting a chat generation
# ----------------------------------------------------------------------------------------------

@dataclass(slots=True)
class ChatRun:
    """A chat generation under way: its stream, and what parsing its output needs.

    ``reasoning`` is where each sample's output starts (reasoning.py's ``THINKING`` / ``MAY_OPEN`` /
    ``ANSWER``), None when no reasoning parser runs; ``tool_names`` are the tools its answer is parsed for
    (None: the answer is plain content or a response format)."""

    stream: GenerationStream
    request_id: str
    prompt_ids: list[int]
    n: int
    tools: ToolPlan
    tool_names: Optional[list[str]]
    reasoning: Optional[str]
    table: TokenTable

    def parser(self) -> SampleParser:
        """A fresh parser for one sample's output."""
        return SampleParser(self.reasoning, self.tool_names, not self.tools.parallel)


async def start_chat(ctx: ServerContext, req: ChatCompletionRequest, route: str, request_id: str,
                     effort_param: str = "reasoning_effort") -> ChatRun:
    """Render, tokenize, plan tools and grammar, and submit ``req`` to the engine (raising a 400 naming the
    field for anything invalid, before the engine sees it). ``effort_param`` names the reasoning effort in
    errors (``reasoning_effort`` on chat, ``reasoning.effort`` on responses)."""
    tools = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls)
    # A forced call leaves no content for a response_format to shape (OpenAI accepts both): the call's
    # grammar wins. Under a response_format the content is that format, so only forced calls are parsed.
    constraint = request_guide(req)
    spec = tools.guide() or constraint
    tool_names = tools.names if tools.forced or (tools.mode == "auto" and spec is None) else None
    engine = ctx.require_engine()
    template = ctx.chat_template or getattr(engine.tokenizer, "chat_template", None) or ""
    parser_name = reasoning_parser(ctx.settings.reasoning_parser, template)
    # The client's own template variables win over what the effort maps to.
    template_kwargs = {**effort_template_kwargs(req.reasoning_effort, parser_name, template, effort_param),
                       **(req.chat_template_kwargs or {})}
    prompt = render_chat_request(engine.tokenizer, req, tools, ctx.chat_template, template_kwargs)
    state = start_state(parser_name, prompt)
    ids = tokenize(engine, prompt, "messages")
    max_field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_new = resolve_max_new_tokens(req.max_completion_tokens or req.max_tokens, len(ids), ctx.limits(engine),
                                     field=max_field, prompt_field="messages")
    names = {**CHAT_NAMES, "max_new_tokens": max_field}
    if spec is not None and state in (THINKING, MAY_OPEN):
        # The constraint is for the answer: the grammar lets the thinking run free first. Its own errors
        # are still found and named by compiling it alone (parts).
        spec = dataclasses.replace(spec, grammar=think_grammar(spec.grammar, state),
                                   parts=spec.parts or ((spec.param, spec.grammar),))
    guide = await compile_guide(engine, spec) if spec is not None else None
    processors = guide.processor if guide is not None else None
    if tool_names is not None:  # the output is parsed for calls: end it at a repeated (or, single, a first) call
        processors = tools.processor_factory(processors, engine.tokenizer, engine.eos_token_ids,
                                             answer=lambda text: answer_text(text, state))
    elif processors is None and state in (None, ANSWER) and follows_tool_results_as_text(req.messages, template):
        processors = lambda: NoTagEcho(engine.tokenizer)  # noqa: E731 - an answer in words, not an echoed tag
    params = sampling_params(req, engine, max_new, (req.top_logprobs or 0) if req.logprobs else None, req.n, names,
                             processors, defaults=ctx.sampling_defaults(engine))
    stream = GenerationStream(ctx, engine, route)
    stream.submit([ids], params, request_id, names)
    return ChatRun(stream, request_id, ids, req.n, tools, tool_names, state, token_table(engine))
