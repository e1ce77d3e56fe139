"""Per-request limits that keep one small request from stalling or exhausting the server, checked before any
heavy work (templating, tokenizing, grammar compiling), with TGI's names where TGI has the limit:

- ``--payload-limit`` (2 MB): a larger body gets 413 before it is read (:class:`PayloadLimitMiddleware`);
- ``--max-client-batch-size`` (4): prompts in one /v1/completions request;
- ``--max-best-of`` (2): ``best_of`` on /v1/completions as on /generate;
- ``--max-stop-sequences`` (4, OpenAI's limit too): stop strings of any route, each at most
  :data:`MAX_STOP_CHARS` characters;
- sequences in flight (prompts x samples, over all requests) at most ``max_concurrent_requests x
  max_client_batch_size``: beyond, 429 with ``Retry-After``, as when all request slots are taken.

FastAPI has a ``max_body_size`` of its own since 0.16x; its 413 has FastAPI's ``{"detail"}`` shape rather than
OpenAI's error object, and the package supports older FastAPI releases, hence the middleware here.
"""

from __future__ import annotations

from typing import Any, Optional

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .context import ServerContext
from .errors import APIError, BadRequest, Overloaded
from .params import stop_list

# Longest stop string (characters): matching is linear in it at every token, and nothing longer stops text.
MAX_STOP_CHARS = 512


class PayloadTooLarge(APIError):
    """413: the request body is over ``--payload-limit``."""

    status_code = 413
    tgi_status_code = 413
    type = "invalid_request_error"
    tgi_error_type = "payload_too_large"

    def __init__(self, limit: int):
        super().__init__(f"Request body too large: at most {limit} bytes (--payload-limit)",
                         code="payload_too_large")


class _TooLarge(StarletteHTTPException):
    # An HTTPException: FastAPI turns any other exception raised while it reads a body into a 400.
    def __init__(self, error: PayloadTooLarge):
        super().__init__(413, error.message)


class PayloadLimitMiddleware:
    """413 for a body over ``limit`` bytes: at once from its Content-Length, before a byte of it is read, or
    when a chunked body passes the limit (what was read is dropped)."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = PayloadTooLarge(self.limit)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await error.response(scope["path"])(scope, receive, send)
            return
        received, started = 0, False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise _TooLarge(error)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            if not started:
                await error.response(scope["path"])(scope, receive, send)


def check_request(ctx: ServerContext, req: Any, route: str) -> None:
    """Refuse a /v1 generation request over a limit (400 naming the field) or while the server is full (429),
    before its prompt is templated or tokenized.

    Example:
        >>> from tgi_nb.server.protocol import CompletionRequest
        >>> check_request(ctx, CompletionRequest(prompt=["a"] * 5), "completions")   # doctest: +SKIP
        Traceback (most recent call last):
        ...
        tgi_nb.server.errors.BadRequest: prompt: at most 4 prompts per request (max_client_batch_size), got 5
    """
    s = ctx.settings
    ctx.check_slot(route)
    check_stop(s.max_stop_sequences, stop_list(req.stop), "stop")
    prompts = 1
    prompt = getattr(req, "prompt", None)
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompts = len(prompt)
        if prompts > s.max_client_batch_size:
            raise BadRequest(f"prompt: at most {s.max_client_batch_size} prompts per request "
                             f"(max_client_batch_size), got {prompts}", param="prompt")
    best_of = getattr(req, "best_of", None)
    if best_of is not None and best_of > s.max_best_of:
        raise BadRequest(f"best_of: must be <= {s.max_best_of} (max_best_of), got {best_of}", param="best_of")
    samples = prompts * max(req.n, best_of or 1)
    check_sequences(ctx, samples, "best_of" if best_of else "n")


def check_stop(max_stop_sequences: int, stop: list[str], param: str) -> None:
    """At most ``max_stop_sequences`` stop strings of at most :data:`MAX_STOP_CHARS` characters.

    Example:
        >>> check_stop(4, ["a"] * 5, "stop")
        Traceback (most recent call last):
        ...
        tgi_nb.server.errors.BadRequest: stop: at most 4 stop sequences (max_stop_sequences), got 5
    """
    if len(stop) > max_stop_sequences:
        raise BadRequest(f"{param}: at most {max_stop_sequences} stop sequences (max_stop_sequences), "
                         f"got {len(stop)}", param=param)
    longest = max(stop, key=len, default="")
    if len(longest) > MAX_STOP_CHARS:
        raise BadRequest(f"{param}: each stop sequence must be at most {MAX_STOP_CHARS} characters, got one of "
                         f"{len(longest)}", param=param)


def max_sequences(ctx: ServerContext) -> int:
    """How many sequences (samples of prompts) may be in flight at once over all requests."""
    s = ctx.settings
    return s.max_concurrent_requests * s.max_client_batch_size


def check_sequences(ctx: ServerContext, count: int, param: Optional[str]) -> None:
    """400 when ``count`` sequences could never run at once; 429 while the ones in flight leave no room."""
    cap = max_sequences(ctx)
    if count > cap:
        raise BadRequest(f"{param or 'n'}: {count} samples in one request is more than the server runs at once "
                         f"({cap}: max_concurrent_requests x max_client_batch_size)", param=param)
    if ctx.sequences_in_flight + count > cap:
        retry = ctx.settings.retry_after
        raise Overloaded(f"Model is overloaded: {ctx.sequences_in_flight} sequences are in flight, at most {cap} "
                         f"(max_concurrent_requests x max_client_batch_size); retry after {retry}s",
                         retry_after=retry)


def reserve_sequences(ctx: ServerContext, count: int) -> int:
    """Count ``count`` more sequences in flight (429 beyond the cap); returns ``count`` for the release."""
    check_sequences(ctx, count, None)
    ctx.sequences_in_flight += count
    return count
