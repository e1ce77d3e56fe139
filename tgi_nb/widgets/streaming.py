"""One streamed chat reply through the official ``openai`` client, as the chat and compare widgets show it:
coalesced append-only updates to a transcript, Stop closing the HTTP stream (the server then aborts the request
and frees its KV blocks), and the figures of the stats line taken from the stream itself (TTFT, tokens,
finish_reason), never parsed back out of what was displayed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .lifecycle import UPDATES_PER_SECOND, Coalescer, Job
from .target import Target


def describe_error(exc: BaseException, base_url: Optional[str] = None) -> tuple[Optional[int], str]:
    """(HTTP status or None, a one-line message) for an error from the openai client.

    Example:
        >>> describe_error(RuntimeError("boom"))
        (None, 'RuntimeError: boom')
    """
    import openai

    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        message = body.get("message") or (body.get("error") or {}).get("message") or exc.message
        return exc.status_code, f"{exc.status_code}: {message}"
    if isinstance(exc, openai.APIConnectionError):
        return None, f"cannot reach {base_url or 'the server'}: {exc.__cause__ or exc}"
    if isinstance(exc, openai.APIError):  # an error event inside a stream that had started
        return None, f"the server stopped the answer: {exc.message}"
    return None, f"{type(exc).__name__}: {exc}"


TIPS = {
    "ttft": "Time to first token: from sending the request to the first token arriving (queueing and reading "
            "the prompt)",
    "tokens": "Tokens generated, as the server counted them (usage.completion_tokens)",
    "thinking": "Of those, tokens of the model's thinking (reasoning), shown folded above the answer",
    "speed": "Tokens a second after the first one (1 / mean inter-token latency): the decoding speed this request "
             "got; the Monitor's 'one request' figure",
    "finish_reason": "Why the reply ended. stop: the model finished (or a stop string came); length: cut at "
                     "max_tokens or the context size; tool_calls: it called a tool; content_filter: filtered",
}


def stats_parts(stats: dict[str, Any]) -> list[tuple[str, str]]:
    """The pieces of the line shown under a reply, each with its tooltip ("" for none).

    Example:
        >>> [text for text, _ in stats_parts({"ttft_s": 0.25, "tokens": 12, "tokens_per_s": 30.0,
        ...                                   "finish_reason": "stop"})]
        ['TTFT 0.25 s', '12 tokens', '30.0 tok/s', 'finish_reason: stop']
    """
    parts = []
    if stats.get("ttft_s") is not None:
        parts.append((f"TTFT {stats['ttft_s']:.2f} s", TIPS["ttft"]))
    parts.append((f"{stats.get('tokens', 0)} tokens", TIPS["tokens"]))
    if stats.get("thinking_tokens"):
        parts.append((f"{stats['thinking_tokens']} thinking", TIPS["thinking"]))
    if stats.get("tokens_per_s") is not None:
        parts.append((f"{stats['tokens_per_s']:.1f} tok/s", TIPS["speed"]))
    ended = end_reason(stats)
    parts.append((ended, TIPS["finish_reason"] if ended.startswith("finish_reason") else ""))
    return parts


def format_stats(stats: dict[str, Any]) -> str:
    """The line shown under a reply.

    Example:
        >>> format_stats({"ttft_s": 0.25, "tokens": 12, "tokens_per_s": 30.0, "finish_reason": "stop"})
        'TTFT 0.25 s · 12 tokens · 30.0 tok/s · finish_reason: stop'
    """
    return " · ".join(text for text, _ in stats_parts(stats))


def end_reason(stats: dict[str, Any]) -> str:
    """How a reply ended: its error, "stopped", or its ``finish_reason``.

    Example:
        >>> end_reason({"finish_reason": "length"}), end_reason({"stopped": True})
        ('finish_reason: length', 'stopped')
    """
    if stats.get("error"):
        return stats["error"]
    return "stopped" if stats.get("stopped") else f"finish_reason: {stats.get('finish_reason')}"


def describe_settings(kwargs: dict[str, Any]) -> str:
    """The sampling settings of a request (``create()``'s keyword arguments), in one line.

    Example:
        >>> describe_settings({"temperature": 0.2, "max_tokens": 64, "extra_body": {"top_k": 5}})
        'temperature=0.2, max_tokens=64, top_k=5 (the rest: endpoint defaults)'
    """
    flat = {**{k: v for k, v in kwargs.items() if k != "extra_body"}, **kwargs.get("extra_body", {})}
    own = ", ".join(f"{k}={v}" for k, v in flat.items())
    return f"{own} (the rest: endpoint defaults)" if own else "endpoint defaults"


@dataclass
class Reply:
    """How one streamed reply went: ``text`` (what was shown), timings, ``finish_reason``, usage, the error.

    Example:
        >>> reply = Reply(started=0.0, text="Hi", first_token=0.5, finish_reason="stop", chunks=1, ended=1.0)
        >>> reply.stats()["ttft_s"], format_stats(reply.stats())
        (0.5, 'TTFT 0.50 s · 1 tokens · finish_reason: stop')
    """

    started: float = field(default_factory=time.monotonic)
    text: str = ""
    reasoning: str = ""
    reasoning_chunks: int = 0
    first_token: Optional[float] = None
    last_token: Optional[float] = None
    finish_reason: Optional[str] = None
    usage: Any = None
    chunks: int = 0
    updates: int = 0
    error: Optional[BaseException] = None
    stopped: bool = False
    ended: Optional[float] = None

    def stats(self, base_url: Optional[str] = None) -> dict[str, Any]:
        """The figures of the stats line (and of CompareWidget's table); ``error`` as a one-line message."""
        end = self.ended if self.ended is not None else time.monotonic()
        tokens = self.usage.completion_tokens if self.usage is not None else self.chunks + self.reasoning_chunks
        details = getattr(self.usage, "completion_tokens_details", None)
        thinking = getattr(details, "reasoning_tokens", None) or self.reasoning_chunks
        first = self.first_token
        last = self.last_token if self.last_token is not None else end
        return {
            "ttft_s": None if first is None else first - self.started,
            "tokens": tokens,
            "thinking_tokens": thinking,
            # the decoding speed: tokens after the first over the time they took (1 / mean inter-token latency)
            "tokens_per_s": (tokens - 1) / (last - first) if first and tokens > 1 and last > first else None,
            "elapsed_s": end - self.started,
            "finish_reason": None if self.stopped else self.finish_reason,
            "stopped": self.stopped,
            "updates": self.updates,
            "error": None if self.error is None else describe_error(self.error, base_url)[1],
        }

    @property
    def status_code(self) -> Optional[int]:
        """The HTTP status of the error, if the server answered one."""
        return None if self.error is None else describe_error(self.error)[0]

    def show_end(self, transcript: Any, base_url: Optional[str] = None, *, prefix: str = "",
                 **extra: Any) -> dict[str, Any]:
        """End the transcript's streaming message: the reply (after ``prefix``, what a continued reply had
        already) with its stats line and ``extra`` entry fields, or the error; returns the stats."""
        stats = self.stats(base_url)
        if stats["error"] is not None:
            transcript.end_reply(stats["error"], role="error")
        else:
            transcript.end_reply(prefix + self.text, stats=format_stats(stats), stats_parts=stats_parts(stats),
                                 reasoning=self.reasoning, **extra)
        return stats


def reasoning_delta(delta: Any) -> Optional[str]:
    """The thinking a streamed delta carries: ``reasoning_content`` (tgi_nb, vLLM, DeepSeek) or ``reasoning``
    (vLLM's newer name, OpenRouter).

    Example:
        >>> from types import SimpleNamespace
        >>> reasoning_delta(SimpleNamespace(reasoning_content="Hmm")), reasoning_delta(SimpleNamespace())
        ('Hmm', None)
    """
    return getattr(delta, "reasoning_content", None) or getattr(delta, "reasoning", None)


def stream_reply(target: Target, messages: list[dict[str, Any]], kwargs: dict[str, Any], job: Job,
                 emit: Callable[..., None], updates_per_second: float = UPDATES_PER_SECOND,
                 started: Optional[float] = None) -> Reply:
    """Stream a chat completion of ``messages`` (choice 0) from ``target``, passing the text to ``emit(text)``
    and the model's thinking to ``emit(text, "reasoning")`` at most ``updates_per_second`` times a second
    each, until it ends or ``job`` is stopped (which closes the stream).

    Never raises: an error is in the returned :class:`Reply`. What arrived before a stop stays in ``text``;
    what had not been shown yet is dropped with the rest.

    Example:
        >>> from tgi_nb.widgets.lifecycle import Job
        >>> reply = stream_reply(Target.of("http://127.0.0.1:9"), [{"role": "user", "content": "Hi"}],
        ...                      {"max_tokens": 4}, Job(), print)
        >>> reply.stats("http://127.0.0.1:9/v1")["error"]
        'cannot reach http://127.0.0.1:9/v1: ...'
    """
    reply = Reply(started=started if started is not None else time.monotonic())
    shown = Coalescer(emit, updates_per_second)
    thought = Coalescer(lambda text: emit(text, "reasoning"), updates_per_second)
    stream = None
    forget: Optional[Callable[[], None]] = None
    try:
        client = target.client()
        stream = client.chat.completions.create(
            model=target.model, messages=messages, stream=True, stream_options={"include_usage": True}, **kwargs)
        forget = job.on_stop(stream.close)  # at once when Stop came before the response did
        for chunk in stream:
            if job.stopping.is_set():
                break
            if chunk.usage is not None:
                reply.usage = chunk.usage
            for choice in chunk.choices:
                if choice.index != 0:
                    continue
                thinking = reasoning_delta(choice.delta)
                if choice.delta.content or thinking:
                    reply.last_token = time.monotonic()
                    if reply.first_token is None:
                        reply.first_token = reply.last_token
                if thinking:
                    thought.add(thinking)
                    reply.reasoning_chunks += 1
                if choice.delta.content:
                    thought.flush()  # the thinking is complete on screen before the answer starts
                    shown.add(choice.delta.content)
                    reply.chunks += 1
                reply.finish_reason = choice.finish_reason or reply.finish_reason
    except Exception as exc:  # noqa: BLE001 - every failure is shown where the reply would have been
        if not job.stopping.is_set():
            reply.error = exc
    finally:
        if forget is not None:
            forget()
        if stream is not None:
            try:
                stream.close()
            except Exception:  # noqa: BLE001 - closing a stream that Stop closed already
                pass
    reply.stopped = job.stopping.is_set()
    if not reply.stopped:
        thought.flush()  # the last few tokens: an ended reply is shown in full
        shown.flush()
    reply.text, reply.reasoning, reply.ended = shown.text, thought.text, time.monotonic()
    reply.updates = shown.updates + thought.updates
    return reply
