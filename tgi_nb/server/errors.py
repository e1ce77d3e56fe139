"""Errors with one meaning and two shapes: OpenAI's on /v1 routes, TGI's everywhere else.

A route raises an :class:`APIError` subclass; the handlers installed by :func:`install_error_handlers`
render it as ``{"error": {"message", "type", "param", "code"}}`` when the path starts with ``/v1`` and
as ``{"error", "error_type"}`` (with TGI's status codes) otherwise. FastAPI's request validation
errors, unknown routes and unexpected exceptions go through the same two shapes.

Example:
    >>> err = BadRequest("temperature: must be in [0, 2], got 3", param="temperature")
    >>> err.openai_body()["error"]["param"], err.status_code, err.tgi_status_code
    ('temperature', 400, 422)
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

logger = logging.getLogger("tgi_nb.server")


def is_openai_path(path: str) -> bool:
    """True for the routes that answer in OpenAI's error shape.

    Example:
        >>> is_openai_path("/v1/chat/completions"), is_openai_path("/generate")
        (True, False)
    """
    return path == "/v1" or path.startswith("/v1/")


class APIError(Exception):
    """Base of every error a route raises on purpose.

    ``status_code``/``type`` are what OpenAI clients see; ``tgi_status_code``/``tgi_error_type`` what
    TGI clients see (huggingface_hub maps ``error_type`` to its exception classes).
    """

    status_code = 500
    type = "server_error"
    tgi_status_code = 500
    tgi_error_type = "incomplete_generation"

    def __init__(self, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def openai_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def tgi_body(self) -> dict[str, Any]:
        return {"error": self.message, "error_type": self.tgi_error_type}

    def response(self, path: str) -> JSONResponse:
        if is_openai_path(path):
            return ErrorResponse(self.openai_body(), status_code=self.status_code, headers=self.headers)
        return ErrorResponse(self.tgi_body(), status_code=self.tgi_status_code, headers=self.headers)


class ErrorResponse(JSONResponse):
    """A JSON error body written in ASCII (``\\u`` escapes): a message that quotes the client's input
    may hold text that is not valid Unicode (a lone surrogate), which UTF-8 cannot encode; escaped, it
    still reaches the client, instead of turning a 400 into a 500.

    Example:
        >>> ErrorResponse({"error": "bad \\ud800"}).body
        b'{"error":"bad \\\\ud800"}'
    """

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class BadRequest(APIError):
    """A parameter is invalid; the message names it and the allowed values."""

    status_code = 400
    type = "invalid_request_error"
    tgi_status_code = 422
    tgi_error_type = "validation"


class ContextLengthExceeded(BadRequest):
    """Prompt (plus requested tokens) longer than the server's limits; the message states the numbers."""

    def __init__(self, message: str, *, param: Optional[str] = "messages"):
        super().__init__(message, param=param, code="context_length_exceeded")


class Unauthorized(APIError):
    status_code = 401
    type = "invalid_request_error"
    tgi_status_code = 401
    tgi_error_type = "authentication"

    def __init__(self, message: str):
        super().__init__(message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class NotFound(APIError):
    status_code = 404
    type = "invalid_request_error"
    tgi_status_code = 404
    tgi_error_type = "not_found"


class Overloaded(APIError):
    """MAX_CONCURRENT_REQUESTS requests are in flight; the client should retry after ``Retry-After``."""

    status_code = 429
    type = "rate_limit_error"
    tgi_status_code = 429
    tgi_error_type = "overloaded"

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message, code="rate_limit_exceeded", headers={"Retry-After": str(retry_after)})


class ModelNotReady(APIError):
    """The model is still loading (or failed to load): 503, as TGI and HF Inference Endpoints answer."""

    status_code = 503
    type = "server_error"
    tgi_status_code = 503
    tgi_error_type = "unhealthy"

    def __init__(self, message: str, retry_after: Optional[int] = 1, code: str = "model_not_ready"):
        headers = {"Retry-After": str(retry_after)} if retry_after else None
        super().__init__(message, code=code, headers=headers)


class OutOfMemory(APIError):
    """The engine ran out of memory for this request: 503 with ``Retry-After``, the request may succeed once others
    finished. (One that could never fit is refused up front with a 400 naming the field.)"""

    status_code = 503
    type = "server_error"
    tgi_status_code = 503
    tgi_error_type = "out_of_memory"

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message, code="out_of_memory", headers={"Retry-After": str(retry_after)})


class GenerationFailed(APIError):
    """The engine failed the request while generating."""

    status_code = 500
    type = "server_error"
    tgi_status_code = 424
    tgi_error_type = "generation"


def logged_failure(what: str, detail: str, exc_info: Optional[BaseException] = None) -> str:
    """The message a client gets for a failure whose detail only the log holds (exception text can name local
    paths, model folders or keys): ``what`` and an error id, which the log line carries with ``detail``.

    Example:
        >>> logged_failure("generation failed", "OSError: /home/me/model: gone").startswith("generation failed (error id ")
        True
    """
    error_id = uuid.uuid4().hex[:12]
    logger.error("%s (error id %s): %s", what, error_id, detail, exc_info=exc_info)
    return f"{what} (error id {error_id}); the server's log has the details"


def _loc_to_param(loc: tuple) -> Optional[str]:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    # Pydantic names the union member it tried (``str``, ``list[str]``...) in the location; a client
    # wants the field.
    parts = [p for p in parts if not (p.startswith(("list[", "dict[", "function-")) or
                                      p in ("str", "int", "float", "bool", "function-after"))]
    return ".".join(parts) or None


def validation_error_from_pydantic(exc: RequestValidationError) -> BadRequest:
    """One :class:`BadRequest` naming the first invalid field and what it accepts.

    Example:
        >>> from pydantic import BaseModel, ValidationError
        >>> class M(BaseModel):
        ...     n: int
        >>> try:
        ...     M(n="x")
        ... except ValidationError as e:
        ...     err = validation_error_from_pydantic(RequestValidationError(e.errors()))
        >>> err.param
        'n'
    """
    errors = exc.errors()
    if not errors:
        return BadRequest("invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return BadRequest("We could not parse the JSON body of your request: "
                          f"{first.get('ctx', {}).get('error', first.get('msg'))}")
    param = _loc_to_param(tuple(first.get("loc", ())))
    msg = first.get("msg", "invalid value")
    given = first.get("input")
    detail = f"{param}: {msg}" if param else msg
    if param and first.get("type") != "missing":
        try:
            detail += f", got {json.dumps(given)[:200]}"
        except (TypeError, ValueError):
            pass
    if len(errors) > 1:
        detail += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return BadRequest(detail, param=param)


class UnexpectedErrorMiddleware:
    """A 500 in the route's error shape for an exception no handler took, its text in the log only.

    Starlette's own last resort (an ``Exception`` handler) sends the response and then re-raises, and uvicorn
    then resets the connection, so clients saw a reset rather than the 500. Once a response has started (a
    stream) there is nothing left to send: the exception is logged and the response ends.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception as exc:  # noqa: BLE001 - the last resort, by design
            message = logged_failure("internal server error", f"{scope['method']} {scope['path']}", exc)
            if not started:
                await APIError(message).response(scope["path"])(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error of ``app`` through the OpenAI or TGI shape (see module docstring)."""
    app.add_middleware(UnexpectedErrorMiddleware)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        err = validation_error_from_pydantic(exc)
        logger.info("400 %s %s: %s", request.method, request.url.path, err.message)
        return err.response(request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        path = request.url.path
        if exc.status_code == 404:
            err: APIError = NotFound(f"Invalid URL ({request.method} {path})")
        elif exc.status_code == 405:
            err = NotFound(f"Invalid method {request.method} for URL {path}")
            err.status_code = err.tgi_status_code = 405
        else:
            err = APIError(str(exc.detail))
            err.status_code = err.tgi_status_code = exc.status_code
            err.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        err.headers.update(exc.headers or {})
        return err.response(path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # what fails outside UnexpectedErrorMiddleware
        err = APIError(logged_failure("internal server error", f"{request.method} {request.url.path}", exc))
        return err.response(request.url.path)
