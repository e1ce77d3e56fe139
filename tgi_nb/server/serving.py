"""What every generation route shares: the engine holder, limits, the concurrency cap, token tables,
and :class:`GenerationStream`, which runs one HTTP request's engine requests and hands their outputs
to the route (with keep-alive ticks and client-disconnect detection).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, AsyncIterator, Callable, Optional, Union

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tgi_nb.engine import EmbeddingEngine, RequestOutput, SamplingParams, ValidationError
from tgi_nb.engine.outputs import OUT_OF_MEMORY
from tgi_nb.engine.outputs import TokenLogprob

from .chat import load_chat_template
from .errors import BadRequest, ContextLengthExceeded, GenerationFailed, ModelNotReady, OutOfMemory, Overloaded
from .metrics import ServerMetrics
from .settings import ServerSettings

logger = logging.getLogger("tgi_nb.server")


# ----------------------------------------------------------------------------------------------
# The engine, loaded now or in the background
# ----------------------------------------------------------------------------------------------

def _is_engine(obj: Any) -> bool:
    return (hasattr(obj, "add_request") and hasattr(obj, "tokenizer")) or isinstance(obj, EmbeddingEngine)


class EngineHolder:
    """Holds the engine (an ``LLMEngine``, or the ``EmbeddingEngine`` of /v1/embeddings), or a factory that
    builds it in a background thread.

    ``status`` is one of ``idle`` (nothing loaded yet, or unloaded), ``loading``, ``ready``, ``failed``,
    ``stopped``. Routes call :meth:`get`, which raises :class:`ModelNotReady` (503) unless ready;
    :meth:`unload` frees the model until :meth:`start` loads it again.
    An engine passed in ready-made belongs to the caller and is never shut down here.

    Example:
        >>> holder = EngineHolder(lambda: object())     # a factory; nothing loads until start()
        >>> holder.status
        'idle'
    """

    def __init__(self, engine_or_factory: Any):
        self._lock = threading.Lock()
        self.error: Optional[str] = None
        self.ready = threading.Event()
        self._closed = False
        if _is_engine(engine_or_factory):
            self._factory: Optional[Callable[[], Any]] = None
            self._engine = self._given = engine_or_factory
            self._owned = False
            self.status = "ready"
            self.ready.set()
        elif callable(engine_or_factory):
            self._factory = engine_or_factory
            self._engine = self._given = None
            self._owned = True
            self.status = "idle"
        else:
            raise TypeError(f"engine_or_factory: expected an LLMEngine or a callable returning one, "
                            f"got {type(engine_or_factory).__name__}")

    @property
    def engine(self) -> Any:
        """The engine if loaded, else None (never blocks)."""
        return self._engine

    def start(self) -> None:
        """Begin loading in a daemon thread (no-op when loading or ready). After :meth:`shutdown`,
        starting again is allowed: a server thread stopped and started again serves again."""
        with self._lock:
            if self._closed:
                self._closed = False
                self.status = "idle"
                if self._factory is None:
                    self._engine, self.status = self._given, "ready"
                    self.ready.set()
            if self._factory is None or self.status in ("loading", "ready"):
                return
            self.status, self.error = "loading", None
            self.ready.clear()
            threading.Thread(target=self._load, name="tgi_nb-model-loader", daemon=True).start()

    def _load(self) -> None:
        try:
            engine = self._factory()
        except BaseException as exc:  # noqa: BLE001 - any failure must reach /health, not vanish in a thread
            logger.exception("model failed to load")
            with self._lock:
                self.status, self.error = "failed", f"{type(exc).__name__}: {exc}"
            self.ready.set()
            return
        with self._lock:
            if self._closed:
                engine.shutdown()
                return
            self._engine, self.status = engine, "ready"
        self.ready.set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until loading ended (ready or failed); True when ready."""
        self.ready.wait(timeout)
        return self.status == "ready"

    def get(self) -> Any:
        """The engine, or :class:`ModelNotReady` while it loads or after :meth:`unload` (what loads a freed
        model again is the endpoint's business: ``tgi_nb.endpoints`` wakes it before the request gets here)."""
        engine = self._engine
        if engine is not None:
            return engine
        if self.status == "failed":
            raise ModelNotReady(f"the model failed to load: {self.error}", retry_after=None,
                                code="model_load_failed")
        if self.status == "stopped":
            raise shutting_down()
        raise ModelNotReady("the model is loading, retry shortly", code="model_loading")

    def unload(self) -> None:
        """Free the model (scale to zero, pause) until the next :meth:`start`. Only for factories."""
        if self._factory is None:
            raise RuntimeError("unload: this server was given a ready engine it does not own")
        with self._lock:
            engine, self._engine = self._engine, None
            if self.status == "ready":
                self.status = "idle"
                self.ready.clear()
        if engine is not None:
            engine.shutdown()

    def shutdown(self) -> None:
        """Stop for good: shut the engine down if this holder built it."""
        with self._lock:
            self._closed = True
            engine, self._engine = self._engine, None
            self.status = "stopped"
        self.ready.set()
        if engine is not None and self._owned:
            engine.shutdown()


# ----------------------------------------------------------------------------------------------
# Per-app state
# ----------------------------------------------------------------------------------------------

@dataclass(slots=True)
class Limits:
    """The prompt and total token limits requests are checked against."""

    max_input_tokens: int
    max_total_tokens: int


class ServerContext:
    """Everything a route needs, stored on ``app.state.ctx``."""

    def __init__(self, holder: EngineHolder, settings: ServerSettings,
                 embeddings: Optional[EngineHolder] = None):
        self.holder = holder
        self.embeddings = embeddings  # the /v1/embeddings model's holder; None when the server has none
        self.settings = settings
        self.in_flight = 0
        self.metrics = ServerMetrics(self._engine_stats)
        self.started = int(time.time())
        self.chat_template = load_chat_template(settings.chat_template)
        # Open GenerationStreams, so that a shutdown can end them all at once (see drain()).
        self.streams: set["GenerationStream"] = set()
        self.draining = False

    def _engine_stats(self) -> Any:
        engine = self.holder.engine
        return engine.stats() if engine is not None else None

    def engine(self) -> Any:
        if self.draining:
            raise shutting_down()
        return self.holder.get()

    def drain(self) -> None:
        """Begin shutting down: refuse new generation requests (503) and end every open one now, with a
        503 ``shutting_down`` error (an SSE error event once a stream has started), aborting its engine
        requests so their KV blocks are freed. Called on the event loop's thread when the server starts
        to stop, before uvicorn waits for connections to close; so no stream keeps a stop waiting.

        Example (what ``ServerThread.stop()`` and ``tgi-nb serve``'s Ctrl-C do through
        :class:`~tgi_nb.server.runner.DrainingServer`):
            app.state.ctx.drain()
        """
        self.draining = True
        for stream in list(self.streams):
            stream.interrupt(shutting_down())

    @property
    def served_model_name(self) -> str:
        s = self.settings
        engine = self.holder.engine
        return s.served_model_name or s.model_id or (engine.model_id if engine is not None else None) or "tgi"

    @property
    def embedding_model_name(self) -> str:
        engine = self.embeddings.engine if self.embeddings is not None else None
        return engine.model_id if engine is not None else (self.settings.embedding_model or "")

    def limits(self, engine: Any) -> Limits:
        """The engine's limits, lowered to the settings' where those are stricter."""
        s = self.settings
        max_input = min(x for x in (engine.max_input_tokens, s.max_input_tokens) if x)
        max_total = min(x for x in (engine.max_total_tokens, s.max_total_tokens) if x)
        return Limits(min(max_input, max_total - 1), max_total)

    def acquire_slot(self, route: str) -> None:
        """Count one more request in flight, or refuse it with 429 when MAX_CONCURRENT_REQUESTS are."""
        limit = self.settings.max_concurrent_requests
        if self.in_flight >= limit:
            self.metrics.rejected.inc()
            self.metrics.request_count.labels(route=route).inc()
            self.metrics.request_failure.labels(route=route, err="overloaded").inc()
            raise Overloaded(f"Model is overloaded: {limit} requests are in flight (max_concurrent_requests); "
                             f"retry after {self.settings.retry_after}s", retry_after=self.settings.retry_after)
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)

    def release_slot(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)


def shutting_down() -> ModelNotReady:
    """The 503 every generation request gets once the server has begun to stop."""
    return ModelNotReady("the server is shutting down", retry_after=None, code="shutting_down")


def new_id(prefix: str) -> str:
    """An OpenAI-style id, e.g. ``chatcmpl-3f2a...``.

    Example:
        >>> new_id("cmpl").startswith("cmpl-")
        True
    """
    return f"{prefix}-{uuid.uuid4().hex}"


def log_ignored(route: str, fields: list[str]) -> None:
    if fields:
        logger.warning("%s: ignoring unknown field%s %s", route, "s" if len(fields) > 1 else "", ", ".join(fields))


# ----------------------------------------------------------------------------------------------
# Parameters and limits
# ----------------------------------------------------------------------------------------------

def _bad_request(exc: ValidationError, names: dict[str, str]) -> BadRequest:
    """``exc`` as a :class:`BadRequest` naming the field as the client called it (``names``: engine field
    -> API field), the message's leading ``field:`` renamed too."""
    field = names.get(exc.field, exc.field)
    message = str(exc)
    if message.startswith(f"{exc.field}:"):
        message = f"{field}:{message[len(exc.field) + 1:]}"
    return BadRequest(message, param=field)


def tokenize(engine: Any, prompt: Union[str, list[int]], param: str,
             add_special_tokens: bool = False) -> list[int]:
    """Token ids the engine will see for ``prompt``. Chat prompts come from a template that already has
    the special tokens; raw prompts (completions, /generate) get the tokenizer's own (a BOS for Llama
    models), as vLLM and TGI add them."""
    try:
        ids = engine.tokenize(prompt, add_special_tokens=add_special_tokens)
    except ValidationError as exc:
        raise _bad_request(exc, {"prompt": param}) from exc
    if not ids:
        raise BadRequest(f"{param}: must contain at least one token", param=param)
    return ids


def resolve_max_new_tokens(requested: Optional[int], prompt_len: int, limits: Limits, *,
                           field: str = "max_tokens", prompt_field: str = "messages") -> int:
    """``requested`` checked against the limits, or (when None) everything the context has left.

    Example:
        >>> resolve_max_new_tokens(None, 100, Limits(1024, 2048))
        1948
        >>> resolve_max_new_tokens(2000, 100, Limits(1024, 2048))
        Traceback (most recent call last):
        ...
        tgi_nb.server.errors.ContextLengthExceeded: This model's maximum context length is 2048 tokens. However, you requested 2100 tokens (100 in the messages, 2000 in the completion). Please reduce the length of the messages or completion.
    """
    if prompt_len > limits.max_input_tokens:
        raise ContextLengthExceeded(
            f"This model's maximum input length is {limits.max_input_tokens} tokens (max_input_tokens). "
            f"However, your {prompt_field} resulted in {prompt_len} tokens. "
            f"Please reduce the length of the {prompt_field}.", param=prompt_field)
    if requested is None:
        return limits.max_total_tokens - prompt_len
    if prompt_len + requested > limits.max_total_tokens:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {limits.max_total_tokens} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the {prompt_field}, {requested} in the completion). "
            f"Please reduce the length of the {prompt_field} or completion.", param=field)
    return requested


def make_sampling_params(names: dict[str, str], **kwargs: Any) -> SamplingParams:
    """``SamplingParams(**kwargs)`` with engine validation errors renamed to the API's field names.

    Example:
        >>> make_sampling_params({"max_new_tokens": "max_tokens"}, max_new_tokens=0)
        Traceback (most recent call last):
        ...
        tgi_nb.server.errors.BadRequest: max_tokens: must be an integer >= 1, got 0
    """
    try:
        return SamplingParams(**kwargs)
    except ValidationError as exc:
        raise _bad_request(exc, names) from exc


def parse_logit_bias(logit_bias: Optional[dict[str, float]], vocab_size: int) -> Optional[dict[int, float]]:
    """OpenAI's ``{"token id as string": bias}`` as the engine's ``{int: float}``.

    Example:
        >>> parse_logit_bias({"42": -100}, 50000)
        {42: -100.0}
    """
    if not logit_bias:
        return None
    out = {}
    for key, bias in logit_bias.items():
        try:
            token_id = int(key)
        except (TypeError, ValueError):
            raise BadRequest(f"logit_bias: keys must be token ids, got {key!r}", param="logit_bias") from None
        if not 0 <= token_id < vocab_size:
            raise BadRequest(f"logit_bias: token id {token_id} is outside the vocabulary [0, {vocab_size})",
                             param="logit_bias")
        if not -100 <= bias <= 100:
            raise BadRequest(f"logit_bias: biases must be in [-100, 100], got {bias} for token {token_id}",
                             param="logit_bias")
        out[token_id] = float(bias)
    return out


def _first_lone_surrogate(value: Any, path: str) -> Optional[tuple[str, int, int]]:
    """(field path, character offset, code point) of the first lone surrogate in a string under ``value``
    (dictionary keys included), else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")  # C speed; fails exactly on surrogates
        except UnicodeEncodeError as exc:
            return path, exc.start, ord(value[exc.start])
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            # The path goes into the error message: a key that is itself the bad text is shown escaped.
            name = str(key).encode("utf-8", "backslashreplace").decode("utf-8")
            sub = f"{path}.{name}" if path else name
            found = _first_lone_surrogate(key, sub) or _first_lone_surrogate(item, sub)
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _first_lone_surrogate(item, f"{path}.{index}" if path else str(index))
            if found:
                return found
    return None


def reject_invalid_text(body: Any) -> None:
    """Raise :class:`BadRequest` naming the field when any text in a request body holds a lone UTF-16
    surrogate (``"\\ud800"`` is valid JSON but not Unicode text: no tokenizer, template or grammar can
    take it). OpenAI's, Anthropic's and DeepSeek's APIs reject such a body with a 400 too, rather than
    repairing it into text the client never sent.

    Example:
        >>> reject_invalid_text({"messages": [{"role": "user", "content": "ok \\ud800"}]})
        Traceback (most recent call last):
        ...
        tgi_nb.server.errors.BadRequest: messages.0.content: contains a lone UTF-16 surrogate (U+D800) at character 3; text must be valid Unicode
    """
    data = body.model_dump() if hasattr(body, "model_dump") else body
    found = _first_lone_surrogate(data, "")
    if found is not None:
        path, offset, code = found
        raise BadRequest(f"{path}: contains a lone UTF-16 surrogate (U+{code:04X}) at character {offset}; "
                         "text must be valid Unicode", param=path or None)


def stop_list(stop: Union[None, str, list[str]]) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    return [s for s in stops if s]


# ----------------------------------------------------------------------------------------------
# Token text and bytes
# ----------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, reversed: printable stand-in character -> byte."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenTable:
    """Per-token text, UTF-8 bytes and specialness, cached (logprobs need them for every token).

    Bytes are exact for byte-level BPE vocabularies (GPT-2, Llama 3, Qwen, SmolLM): a token that is half
    of a multi-byte character gets its real bytes, not the replacement character's.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        self._byte_level = any(t.startswith("Ġ") for t in list(vocab)[:5000])
        self._text: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}

    def text(self, token_id: int) -> str:
        text = self._text.get(token_id)
        if text is None:
            text = self._text[token_id] = self.tokenizer.decode([token_id])
        return text

    def bytes(self, token_id: int) -> list[int]:
        data = self._bytes.get(token_id)
        if data is None:
            data = None
            if self._byte_level and token_id not in self.special_ids:
                piece = self.tokenizer.convert_ids_to_tokens(token_id)
                decoder = _byte_decoder()
                if isinstance(piece, str) and all(c in decoder for c in piece):
                    data = [decoder[c] for c in piece]
            if data is None:
                data = list(self.text(token_id).encode("utf-8"))
            self._bytes[token_id] = data
        return data

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids


@lru_cache(maxsize=2)
def _token_table_for(tokenizer: Any) -> TokenTable:
    return TokenTable(tokenizer)


def token_table(engine: Any) -> TokenTable:
    """The (cached) :class:`TokenTable` of ``engine.tokenizer``; only the last two tokenizers are kept."""
    return _token_table_for(engine.tokenizer)


def cumulative_logprob(logprobs: Optional[list[TokenLogprob]]) -> float:
    """The sum of a sample's token log-probabilities (0 when it has none), to rank best_of candidates."""
    return sum(lp.logprob for lp in logprobs or [])


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

    def __init__(self, ctx: ServerContext, engine: Any, route: str):
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
        for i, (ids, params) in enumerate(zip(prompts, per_prompt)):
            rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
            put = self._queue.put_nowait
            loop = self._loop

            def on_output(out: RequestOutput, i: int = i) -> None:
                # Called on the engine thread; the loop may be gone if the server stopped.
                if not loop.is_closed():
                    loop.call_soon_threadsafe(put, (i, out))

            try:
                self.engine.add_request(ids, params, rid, on_output)
            except ValidationError as exc:
                self.fail("validation")
                raise _bad_request(exc, names) from exc
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
        raise GenerationFailed(f"generation failed: {out.error}")
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
