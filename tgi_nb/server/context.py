"""Per-app server state: the engine holder (loaded now, in the background, or again after a scale to zero),
the limits every route checks, the concurrency cap, and the shutdown drain (:class:`ServerContext`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from tgi_nb.engine import EmbeddingEngine
from tgi_nb.engine.capacity import RequestLimits
from tgi_nb.engine.interface import GenerationEngine

from .chat import load_chat_template
from .responses_store import ResponseStore
from .errors import ModelNotReady, Overloaded
from .generation_defaults import sampling_defaults
from .metrics import ServerMetrics
from .settings import ServerSettings

if TYPE_CHECKING:  # streaming imports this module
    from .streaming import GenerationStream

logger = logging.getLogger("tgi_nb.server")


# ----------------------------------------------------------------------------------------------
# The engine, loaded now or in the background
# ----------------------------------------------------------------------------------------------

def _is_engine(obj: Any) -> bool:
    return isinstance(obj, (GenerationEngine, EmbeddingEngine))


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

class ServerContext:
    """Everything a route needs, stored on ``app.state.ctx``."""

    def __init__(self, holder: EngineHolder, settings: ServerSettings,
                 embeddings: Optional[EngineHolder] = None):
        self.holder = holder
        self.embeddings = embeddings  # the /v1/embeddings model's holder; None when the server has none
        self.settings = settings
        self.in_flight = 0
        self.sequences_in_flight = 0   # samples of the requests in flight (limits.reserve_sequences)
        self.metrics = ServerMetrics(self._engine_stats)
        self.started = int(time.time())
        self.chat_template = load_chat_template(settings.chat_template)
        self.responses = ResponseStore()  # /v1/responses with store=true (bounded; see responses_store.py)
        self._sampling_defaults: tuple[Any, dict[str, float]] = (None, {})  # (engine, its defaults)
        # Open GenerationStreams, so that a shutdown can end them all at once (see drain()).
        self.streams: set["GenerationStream"] = set()
        self.draining = False

    def _engine_stats(self) -> Any:
        engine = self.loaded_engine
        return engine.stats() if engine is not None else None

    # The one way for a route to reach the engine: require_engine() when it must generate (503 while the
    # model loads, is freed or the server drains), loaded_engine when it only reports (None then).
    def require_engine(self) -> GenerationEngine:
        """The loaded engine; raises :class:`~tgi_nb.server.errors.ModelNotReady` (503) otherwise."""
        if self.draining:
            raise shutting_down()
        return self.holder.get()

    @property
    def loaded_engine(self) -> Optional[GenerationEngine]:
        """The engine if it is loaded, else None: for routes that report (/info, /v1/models), never a 503."""
        return self.holder.engine

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
        engine = self.loaded_engine
        return s.served_model_name or s.model_id or (engine.model_id if engine is not None else None) or "tgi"

    @property
    def embedding_model_name(self) -> str:
        engine = self.embeddings.engine if self.embeddings is not None else None
        return engine.model_id if engine is not None else (self.settings.embedding_model or "")

    def sampling_defaults(self, engine: Optional[GenerationEngine]) -> dict[str, float]:
        """The model's recommended sampling settings for requests that leave them out (generation_defaults.py),
        read once per loaded engine; ``{}`` without one."""
        if engine is None:
            return {}
        loaded_for, defaults = self._sampling_defaults
        if loaded_for is not engine:
            defaults = sampling_defaults(self.settings.generation_config, getattr(engine, "model_dir", None))
            self._sampling_defaults = (engine, defaults)
        return defaults

    def limits(self, engine: GenerationEngine) -> RequestLimits:
        """The engine's limits, lowered to the settings' where those are stricter."""
        s = self.settings
        return RequestLimits(engine.max_input_tokens, engine.max_total_tokens).within(s.max_input_tokens,
                                                                                      s.max_total_tokens)

    def acquire_slot(self, route: str) -> None:
        """Count one more request in flight, or refuse it with 429 when MAX_CONCURRENT_REQUESTS are."""
        self.check_slot(route)
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)

    def check_slot(self, route: str) -> None:
        """429 when MAX_CONCURRENT_REQUESTS are in flight: checked before a request's heavy work (templating,
        tokenizing), its slot taken once the work is done."""
        limit = self.settings.max_concurrent_requests
        if self.in_flight >= limit:
            self.metrics.rejected.inc()
            self.metrics.request_count.labels(route=route).inc()
            self.metrics.request_failure.labels(route=route, err="overloaded").inc()
            raise Overloaded(f"Model is overloaded: {limit} requests are in flight (max_concurrent_requests); "
                             f"retry after {self.settings.retry_after}s", retry_after=self.settings.retry_after)

    def release_slot(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)


def shutting_down() -> ModelNotReady:
    """The 503 every generation request gets once the server has begun to stop."""
    return ModelNotReady("the server is shutting down", retry_after=None, code="shutting_down")
