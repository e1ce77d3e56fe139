"""Running one HTTP request's engine requests: :class:`GenerationStream` (keep-alive ticks, client-disconnect
detection, aborts that free KV blocks), the finish check, and server-sent events.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Callable, Optional, Union

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tgi_nb.engine import RequestOutput, SamplingParams, ValidationError
from tgi_nb.engine.interface import GenerationEngine
from tgi_nb.engine.outputs import OUT_OF_MEMORY

from .context import ServerContext
from .errors import GenerationFailed, ModelNotReady, OutOfMemory, logged_failure
from .limits import reserve_sequences
from .params import bad_request
from .priority import request_priority

logger = logging.getLogger("tgi_nb.server")


# ----------------------------------------------------------------------------------------------
# Running a request
# ----------------------------------------------------------------------------------------------

class ClientDisconnected(Exception):
    """The HTTP client went away; its engine requests have been aborted."""


KEEP_ALIVE = object()
_WAKE = object()  # queued to wake events() after interrupt()


class GenerationStream:
    """One HTTP request's engine requests (one per prompt), their outputs, metrics and clean-up.

    Holds a concurrency slot from creation to :meth:`close`, which also aborts every unfinished engine
    request (freeing its KV blocks before the engine's next step). ``close`` is idempotent; routes call
    it in ``finally`` and from the SSE response's close hook, so a client that disconnects at any point
    releases everything at once.

    Example (inside a route):
        stream = GenerationStream(ctx, engine, "completions")
        stream.submit([ids], params, "cmpl-1")      # closes the stream itself if it raises
        try:
            results = await stream.collect(request)
        finally:
            stream.close()
    """

    def __init__(self, ctx: ServerContext, engine: GenerationEngine, route: str):
        ctx.acquire_slot(route)
        self.ctx, self.engine, self.route = ctx, engine, route
        self.metrics = ctx.metrics
        self.metrics.request_count.labels(route=route).inc()
        self.arrival = time.perf_counter()
        self.request_ids: list[str] = []
        self.prompt_lens: list[int] = []
        self.generated: list[int] = []
        self._last: list[Optional[float]] = []
        self._unfinished: set[int] = set()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._watcher: Optional[asyncio.Task] = None
        self._closed = False
        self._outcome: Optional[str] = None
        self._interruption: Optional[BaseException] = None
        self._sequences = 0   # counted in ctx.sequences_in_flight until close()
        ctx.streams.add(self)

    # -- submission ----------------------------------------------------------------------------
    def submit(self, prompts: list[list[int]], params: Union[SamplingParams, list[SamplingParams]],
               request_id: str, field_names: Optional[dict[str, str]] = None) -> None:
        """Queue one engine request per prompt (``params`` shared or one per prompt); raises
        :class:`BadRequest` before anything runs. On any failure the stream is closed (what was queued is
        aborted, the slot released) before the exception propagates."""
        try:
            self._submit(prompts, params, request_id, field_names or {})
        except BaseException:
            self.close()
            raise

    def _submit(self, prompts: list[list[int]], params: Union[SamplingParams, list[SamplingParams]],
                request_id: str, names: dict[str, str]) -> None:
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        self._sequences = reserve_sequences(self.ctx, sum(p.n for p in per_prompt))   # 429 when the server is full
        for i, (ids, params) in enumerate(zip(prompts, per_prompt)):
            rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
            put = self._queue.put_nowait
            loop = self._loop

            def on_output(out: RequestOutput, i: int = i) -> None:
                # Called on the engine thread; the loop may be gone if the server stopped.
                if not loop.is_closed():
                    loop.call_soon_threadsafe(put, (i, out))

            try:
                # The Batch API's lines run at their own priority (set by the batch runner), after interactive ones.
                self.engine.add_request(ids, params, rid, on_output, priority=request_priority.get())
            except ValidationError as exc:
                self.fail("validation")
                raise bad_request(exc, names) from exc
            except RuntimeError as exc:  # the engine was shut down between get() and now
                self.fail("unavailable")
                raise ModelNotReady(str(exc), retry_after=None, code="shutting_down") from exc
            self.request_ids.append(rid)
            self.prompt_lens.append(len(ids))
            self.generated.append(0)
            self._last.append(None)
            self._unfinished.add(i)
            self.metrics.input_length.observe(len(ids))

    # -- outputs -------------------------------------------------------------------------------
    def watch_disconnect(self, request: Request) -> None:
        """Abort everything as soon as the client disconnects (also while nothing is being sent)."""
        if self._watcher is not None:
            return

        async def watch() -> None:
            receive = request.receive
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    break
            if not self._closed and self._unfinished:
                logger.info("client disconnected: aborting %s", ", ".join(self.request_ids))
                self.interrupt(ClientDisconnected(), outcome="disconnect")

        self._watcher = asyncio.ensure_future(watch())

    async def events(self, keep_alive: Optional[float] = None) -> AsyncIterator[Any]:
        """Yield ``(prompt_index, RequestOutput)`` until every engine request finished, and
        :data:`KEEP_ALIVE` after each ``keep_alive`` seconds without output. Raises what
        :meth:`interrupt` was given (:class:`ClientDisconnected` when the client left, a 503 when the
        server stops), whether it happened while waiting or while the caller was sending."""
        while True:
            if self._interruption is not None:
                raise self._interruption
            if not self._unfinished:
                return
            try:
                if keep_alive is None:
                    item = await self._queue.get()
                else:
                    item = await asyncio.wait_for(self._queue.get(), keep_alive)
            except asyncio.TimeoutError:
                yield KEEP_ALIVE
                continue
            if item is _WAKE:
                continue
            i, out = item
            self._observe(i, out)
            yield i, out

    def _observe(self, i: int, out: RequestOutput) -> None:
        now = time.perf_counter()
        new_tokens = sum(len(d.token_ids) for d in out.outputs)
        if new_tokens:
            if self._last[i] is None:
                self.metrics.time_to_first_token.observe(now - self.arrival)
                # Seconds the request waited before its first step, when the engine reports it.
                queue_time = getattr(out, "queue_time", None)
                if queue_time is not None:
                    self.metrics.queue_duration.observe(queue_time)
            else:
                self.metrics.inter_token_latency.observe(now - self._last[i])
            self._last[i] = now
        self.generated[i] += new_tokens
        if out.finished:
            self._unfinished.discard(i)
            self.metrics.generated_tokens.observe(self.generated[i])

    async def collect(self, request: Optional[Request] = None) -> list[list[RequestOutput]]:
        """Every output of every prompt (for non-streaming routes), watching for disconnects."""
        if request is not None:
            self.watch_disconnect(request)
        outputs: list[list[RequestOutput]] = [[] for _ in self.request_ids]
        async for i, out in self.events():
            outputs[i].append(out)
        return outputs

    # -- the end -------------------------------------------------------------------------------
    def interrupt(self, exc: BaseException, outcome: str = "shutdown") -> None:
        """End the stream early: abort its engine requests now, and make :meth:`events` raise ``exc``
        (on the event loop's thread only)."""
        if self._closed:
            return
        self._interruption = exc
        self._queue.put_nowait(_WAKE)
        self.close(outcome=outcome)

    def succeed(self) -> None:
        self._outcome = self._outcome or "success"

    def fail(self, kind: str) -> None:
        self._outcome = self._outcome or kind

    def close(self, outcome: Optional[str] = None) -> None:
        """Abort what is still running, release the slot and record the request's metrics (once)."""
        if outcome:
            self.fail(outcome)
        if self._closed:
            return
        self._closed = True
        self.ctx.streams.discard(self)
        for i in list(self._unfinished):
            try:
                self.engine.abort(self.request_ids[i])
            except Exception:  # noqa: BLE001 - an engine already stopped has nothing left to free
                logger.debug("abort of %s failed", self.request_ids[i], exc_info=True)
        self._unfinished.clear()
        if self._watcher is not None and not self._watcher.done():
            self._watcher.cancel()
        self.ctx.release_slot()
        self.ctx.sequences_in_flight -= self._sequences
        route = self.route
        if self._outcome == "success":
            self.metrics.request_success.labels(route=route).inc()
            self.metrics.request_duration.labels(route=route).observe(time.perf_counter() - self.arrival)
        else:
            self.metrics.request_failure.labels(route=route, err=self._outcome or "incomplete").inc()


def check_finished(out: RequestOutput) -> None:
    """Raise :class:`GenerationFailed` for an output the engine failed or aborted on its own
    (:class:`OutOfMemory`, a 503, when it failed for lack of memory)."""
    if out.error:
        if out.error.startswith(OUT_OF_MEMORY):
            raise OutOfMemory(out.error)
        raise GenerationFailed(logged_failure("generation failed", out.error))   # the engine's text: log only
    for d in out.outputs:
        if d.finish_reason == "error":
            raise GenerationFailed("generation failed")
        if d.finish_reason == "abort":
            raise GenerationFailed("the request was aborted (the engine is shutting down)")


# ----------------------------------------------------------------------------------------------
# Server-sent events
# ----------------------------------------------------------------------------------------------

SSE_KEEP_ALIVE = b": keep-alive\n\n"
SSE_DONE = b"data: [DONE]\n\n"


def sse(data: Union[str, bytes]) -> bytes:
    """One SSE event carrying ``data`` (a JSON document, one line).

    Example:
        >>> sse('{"a": 1}')
        b'data: {"a": 1}\\n\\n'
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    return b"data: " + data + b"\n\n"


class SSEResponse(StreamingResponse):
    """A ``text/event-stream`` response that runs ``on_close`` however it ends (finished, client gone,
    server stopping), even if its body iterator never started."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None], headers=None):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                           **(headers or {})})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:  # noqa: BLE001 - closing an iterator cancelled mid-await can complain
                    pass
