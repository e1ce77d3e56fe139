"""The server side of a local endpoint, the same in a kernel thread and in a child process.

:func:`build_endpoint_app` turns an endpoint's launcher settings (TGI's environment variable names) into the
server's app wrapped by :class:`ControlledApp`, which adds what Hugging Face Inference Endpoints do around TGI:

- pause: the model is freed and every route but /health, /info, /metrics and the docs answers 503 until resume;
- scale to zero: the model is freed and the next request loads it again, waiting for it rather than failing
  (/health says 503 meanwhile); with ``scale_to_zero_after`` this happens by itself after that many idle seconds;
- limits larger than the model's context or the memory for the KV cache are lowered to what fits (by the engine's
  capacity planner, the same as for ``tgi-nb serve``), with a note that the notebook side shows as a warning;
- a control route (child processes only, behind a per-endpoint secret) through which the kernel pauses,
  resumes and scales the child's model and reads its state.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from typing import Any, Callable, Optional

logger = logging.getLogger("tgi_nb.endpoints")

CONTROL_PREFIX = "/_tgi_nb/endpoint/"
CONTROL_HEADER = "x-tgi-nb-control-token"
# Routes that never wake a scaled-to-zero model nor count as activity (health checks must not keep it awake).
PASSIVE_PATHS = frozenset({"/health", "/info", "/metrics", "/docs", "/redoc", "/openapi.json",
                           "/docs/oauth2-redirect"})
WAKE_TIMEOUT = 600.0  # seconds a request waits for a waking model; openai-python's default timeout too

# The launcher option behind each limit, and the names a user may have set it with (the first set is quoted).
_LIMIT_NAMES = {
    "max_input_tokens": ("MAX_INPUT_TOKENS", "MAX_INPUT_LENGTH", "--max-input-tokens"),
    "max_total_tokens": ("MAX_TOTAL_TOKENS", "--max-total-tokens"),
    "max_batch_total_tokens": ("MAX_BATCH_TOTAL_TOKENS", "--max-batch-total-tokens"),
    "max_batch_prefill_tokens": ("MAX_BATCH_PREFILL_TOKENS", "--max-batch-prefill-tokens"),
}


class Notes:
    """Warnings about how the endpoint was adapted to this machine, each kept once, in order."""

    def __init__(self) -> None:
        self._items: list[str] = []
        self._lock = threading.Lock()

    def add(self, message: str) -> None:
        with self._lock:
            if message in self._items:
                return
            self._items.append(message)
        logger.info("%s", message)  # shown to the user as an EndpointWarning by wait() and fetch()

    def list(self) -> list[str]:
        with self._lock:
            return list(self._items)


# ----------------------------------------------------------------------------------------------------------
# Fitting limits to the model and the machine
# ----------------------------------------------------------------------------------------------------------

def _limit_name(option: str, env: dict[str, str], args: tuple[str, ...]) -> str:
    names = _LIMIT_NAMES[option]
    for name in names:
        if name in env or name in args:
            return name
    return names[0]


def note_capacity(engine: Any, notes: Notes, *, env: dict[str, str], args: tuple[str, ...]) -> None:
    """Add the engine's capacity decisions to ``notes``: each limit its planner lowered, named as the user set it
    (``MAX_INPUT_LENGTH=4096 ...``), then, when anything was lowered, how the KV cache was sized and what the
    weights take. The same sentences ``tgi-nb serve`` logs, from the same
    :class:`~tgi_nb.engine.capacity.CapacityPlan` (``/info`` carries them too).

    Example:
        >>> from types import SimpleNamespace
        >>> from tgi_nb.engine.capacity import CapacityRequest, ModelShape, plan_capacity
        >>> plan = plan_capacity(ModelShape(2, 1, 8, 2048), CapacityRequest(max_total_tokens=32000), None)
        >>> notes = Notes()
        >>> note_capacity(SimpleNamespace(capacity=plan, weights_bytes=0), notes, env={"MAX_TOTAL_TOKENS": "32000"},
        ...               args=())
        >>> notes.list()[0]
        "MAX_TOTAL_TOKENS=32000 is more than the model's context (2048 tokens): lowered to 2048."
    """
    plan = engine.capacity
    for lowering in plan.lowerings:
        notes.add(lowering.message(_limit_name(lowering.field, env, args)))
    if plan.lowerings:
        notes.add(f"{plan.sizing}; the weights take {engine.weights_bytes / 2**30:.2f} GiB.")


def choose_device(opts: dict[str, Any], accelerator: Optional[str], notes: Notes) -> None:
    """Set ``opts["device"]`` from huggingface_hub's ``accelerator`` ("gpu", "cpu", ...) unless DEVICE was given.

    A GPU asked for on a machine without CUDA falls back to the CPU with a note, as does any other accelerator
    (neuron, inf2...) that tgi_nb does not drive.
    """
    if opts.get("device") or not accelerator:
        return
    kind = accelerator.lower()
    if kind in ("gpu", "cuda"):
        import torch

        if torch.cuda.is_available():
            opts["device"] = "cuda"
        else:
            opts["device"] = "cpu"
            notes.add(f"accelerator={accelerator!r} but this machine has no CUDA GPU: running on the CPU.")
    elif kind == "cpu":
        opts["device"] = "cpu"
    else:
        opts["device"] = "cpu"
        notes.add(f"accelerator={accelerator!r} is not supported by tgi_nb: running on the CPU.")


# ----------------------------------------------------------------------------------------------------------
# Pause, resume, scale to zero
# ----------------------------------------------------------------------------------------------------------

class EndpointController:
    """Endpoint life cycle on top of the server's engine holder (``app.state.holder``).

    ``state()`` gives huggingface_hub's status strings: initializing while the model loads, running,
    paused, scaledToZero (freed; the next request loads it again) and failed (with the error as message).

    Example:
        >>> from tgi_nb.server import EngineHolder
        >>> ctl = EndpointController(EngineHolder(lambda: object()), Notes())   # doctest: +SKIP
        >>> ctl.state()["state"]                                                  # doctest: +SKIP
        'initializing'
    """

    def __init__(self, holder: Any, notes: Notes, *, scale_to_zero_after: Optional[float] = None):
        self.holder = holder
        self.notes = notes
        self.paused = False
        self.in_flight = 0
        self.last_activity = time.monotonic()
        self.scale_to_zero_after = scale_to_zero_after
        self._freed_once = False
        self._lock = threading.Lock()
        self._closed = threading.Event()
        if scale_to_zero_after:
            threading.Thread(target=self._idle_watch, name="tgi_nb-endpoint-idle", daemon=True).start()

    def state(self) -> dict[str, Any]:
        """``{"state", "message", "warnings", "limits"}``; ``limits`` once a model is loaded."""
        status = self.holder.status
        message = None
        if self.paused:
            state = "paused"
        elif status == "ready":
            state = "running"
        elif status == "loading":
            state = "initializing"
        elif status == "failed":
            state, message = "failed", self.holder.error
        elif status == "idle":
            state = "scaledToZero" if self._freed_once else "initializing"
        else:  # stopped: the server is shutting down
            state, message = "paused", "the server is stopping"
        engine = self.holder.engine
        limits = None
        if engine is not None:
            limits = {"max_input_tokens": engine.max_input_tokens, "max_total_tokens": engine.max_total_tokens,
                      "max_batch_total_tokens": engine.config.max_batch_total_tokens,
                      "device": engine.config.device, "dtype": engine.config.dtype,
                      "kv_cache_dtype": engine.config.kv_cache_dtype, "kv_cache_bytes": engine.capacity.kv_cache_bytes,
                      "weights_bytes": engine.weights_bytes}
        return {"state": state, "message": message, "warnings": self.notes.list(), "limits": limits}

    def pause(self) -> None:
        self.paused = True
        self._free()

    def resume(self) -> None:
        self.paused = False
        self.holder.start()  # no-op when loading or ready; a failed model is loaded again

    def scale_to_zero(self) -> None:
        self.paused = False
        self._free()

    def wake(self) -> None:
        """Start loading a model freed by scale-to-zero (what a request does)."""
        if not self.paused and self.holder.status == "idle":
            self.holder.start()

    def close(self) -> None:
        self._closed.set()

    def _free(self) -> None:
        with self._lock:
            self._freed_once = True
            if self.holder.status == "loading":
                # Freed once loaded, unless a resume or a request wanted it in between.
                threading.Thread(target=self._free_when_loaded, name="tgi_nb-endpoint-free", daemon=True).start()
                return
        self.holder.unload()

    def _free_when_loaded(self) -> None:
        self.holder.wait()
        if self.paused or (self.in_flight == 0 and self.holder.status == "ready"
                           and time.monotonic() - self.last_activity > 0.5):
            self.holder.unload()

    def _idle_watch(self) -> None:
        after = float(self.scale_to_zero_after or 0)
        interval = max(0.1, min(30.0, after / 4))
        ready_since = None
        while not self._closed.wait(interval):
            ready = self.holder.status == "ready"
            # Idle time counts from the later of the last request and the model becoming ready: a load that
            # took longer than the timeout must not be freed the moment it finishes, before anyone used it.
            ready_since = (ready_since or time.monotonic()) if ready else None
            idle = time.monotonic() - max(self.last_activity, ready_since or 0.0)
            if ready and not self.paused and self.in_flight == 0 and idle >= after:
                logger.info("no request for %.0f s: scaling to zero", idle)
                self._freed_once = True
                self.holder.unload()

    def request_started(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.last_activity = time.monotonic()

    def request_finished(self) -> None:
        with self._lock:
            self.in_flight -= 1
            self.last_activity = time.monotonic()


class ControlledApp:
    """ASGI app around the server's: pause, wake-on-request, activity tracking and the control route.

    Requests that need the model wait (up to ``wake_timeout`` seconds, asynchronously) while it loads after a
    scale to zero or at start-up, so the first request after ``scale_to_zero()`` simply takes longer, as on
    Hugging Face. Unauthenticated requests never wake the model: they reach the server's own 401.
    """

    def __init__(self, app: Any, controller: EndpointController, *, api_key: Optional[str] = None,
                 control_token: Optional[str] = None, wake_timeout: float = WAKE_TIMEOUT):
        self.app = app
        self.controller = controller
        self.api_key = api_key
        self.control_token = control_token
        self.wake_timeout = wake_timeout

    @property
    def state(self) -> Any:  # uvicorn and tests reach app.state through the wrapper
        return self.app.state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        from tgi_nb.server.auth import app_path  # lazily, like the other server imports here

        path = app_path(scope)
        if self.control_token and path.startswith(CONTROL_PREFIX):
            await self._control(scope, receive, send, path[len(CONTROL_PREFIX):])
            return
        ctl = self.controller
        if path in PASSIVE_PATHS:
            if path == "/health" and ctl.paused:
                await _json(send, 503, {"error": "the endpoint is paused", "error_type": "healthcheck",
                                        "status": "paused"})
                return
            await self.app(scope, receive, send)
            return
        if ctl.paused:
            from tgi_nb.server.errors import ModelNotReady

            err = ModelNotReady("This endpoint is paused: resume it (endpoint.resume()) to serve requests.",
                                retry_after=None, code="endpoint_paused")
            await err.response(path)(scope, receive, send)
            return
        ctl.request_started()
        try:
            if self.controller.holder.status in ("idle", "loading") and self._authorized(scope):
                ctl.wake()
                await self._wait_ready()
            await self.app(scope, receive, send)
        finally:
            ctl.request_finished()

    def _authorized(self, scope) -> bool:
        if not self.api_key:
            return True
        from tgi_nb.server.auth import check_bearer
        from tgi_nb.server.errors import Unauthorized

        authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1") or None
        try:
            check_bearer(authorization, self.api_key)
        except Unauthorized:
            return False
        return True

    async def _wait_ready(self) -> None:
        holder = self.controller.holder
        deadline = time.monotonic() + self.wake_timeout
        while holder.status in ("idle", "loading") and time.monotonic() < deadline and not self.controller.paused:
            await asyncio.sleep(0.05)

    async def _control(self, scope, receive, send, action: str) -> None:
        token = dict(scope["headers"]).get(CONTROL_HEADER.encode(), b"").decode("latin-1")
        if not hmac.compare_digest(token.encode(), (self.control_token or "").encode()):
            await _json(send, 403, {"error": "control token missing or wrong", "error_type": "authentication"})
            return
        ctl = self.controller
        actions: dict[str, Callable[[], None]] = {"pause": ctl.pause, "resume": ctl.resume,
                                                  "scale_to_zero": ctl.scale_to_zero}
        if scope["method"] == "GET" and action == "state":
            await _json(send, 200, ctl.state())
        elif scope["method"] == "POST" and action in actions:
            await asyncio.get_running_loop().run_in_executor(None, actions[action])  # unloading may take a moment
            await _json(send, 200, ctl.state())
        else:
            await _json(send, 404, {"error": f"no control action {action!r}", "error_type": "not_found"})


async def _json(send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


# ----------------------------------------------------------------------------------------------------------
# Building the app from launcher settings
# ----------------------------------------------------------------------------------------------------------

def parse_container_args(args: tuple[str, ...]):
    """``container_args`` parsed with ``tgi-nb serve``'s flags (text-generation-launcher's names)."""
    import argparse

    from tgi_nb.server.launcher import LaunchError, add_serve_arguments

    parser = argparse.ArgumentParser(prog="container_args", add_help=False, exit_on_error=False)
    add_serve_arguments(parser)
    try:
        parsed, unknown = parser.parse_known_args(list(args))
    except argparse.ArgumentError as exc:
        raise LaunchError(f"container_args: {exc}") from None
    if unknown:
        raise LaunchError(f"container_args: unknown flags {unknown}; `tgi-nb serve --help` lists the known ones")
    return parsed


def build_endpoint_app(*, model_id: str, revision: Optional[str], env: dict[str, str], args: tuple[str, ...] = (),
                       api_key: Optional[str] = None, accelerator: Optional[str] = None,
                       scale_to_zero_after: Optional[float] = None, control_token: Optional[str] = None,
                       wake_timeout: float = WAKE_TIMEOUT) -> ControlledApp:
    """The server app for one endpoint, configured as ``text-generation-launcher`` would be by ``env`` (TGI's
    variable names, read from this dict only, never from the process environment) and ``args`` (its flags).

    Settings that contradict each other raise ``LaunchError`` here; the model loads when the app starts (in the
    server's loader thread), and its limits are fitted to the model and memory as it loads.

    Example:
        >>> app = build_endpoint_app(model_id="HuggingFaceTB/SmolLM2-135M-Instruct", revision=None,
        ...                          env={"MAX_TOTAL_TOKENS": "32000"}, api_key="secret")   # doctest: +SKIP
        >>> server = ServerThread(app, port=0).start()                                        # doctest: +SKIP
    """
    from tgi_nb.server import build_app
    from tgi_nb.server.launcher import plan_from_options, resolve_options

    notes = Notes()
    opts = resolve_options(parse_container_args(args), env)
    if opts["model_id"] in (None, "", "/repository"):
        opts["model_id"] = model_id
    opts["revision"] = opts["revision"] or revision
    opts["api_key"] = api_key
    choose_device(opts, accelerator, notes)
    # Validates every option now; the engine's capacity planner fits the limits to the model and memory.
    settings = plan_from_options(opts).settings

    def load_engine() -> Any:
        engine = plan_from_options(opts).engine_factory()
        note_capacity(engine, notes, env=env, args=args)
        return engine

    app = build_app(load_engine, settings)
    controller = EndpointController(app.state.holder, notes, scale_to_zero_after=scale_to_zero_after)
    return ControlledApp(app, controller, api_key=api_key, control_token=control_token, wake_timeout=wake_timeout)
