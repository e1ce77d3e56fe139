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
from urllib.parse import parse_qs

from .status import (FAILED, INITIALIZING, PAUSED, PENDING, RUNNING, SCALED_TO_ZERO, StatusMachine,
                     allowed_actions)

logger = logging.getLogger("tgi_nb.endpoints")

CONTROL_PREFIX = "/_tgi_nb/endpoint/"
CONTROL_HEADER = "x-tgi-nb-control-token"
# The longest a parent may hold ``GET state?while=<status>`` open: it asks again after that (a change answers it at
# once). A long poll, so that a child process's status reaches the parent as it changes, with nothing polling.
STATE_WAIT_MAX = 60.0
# Routes that never wake a scaled-to-zero model nor count as activity (health checks must not keep it awake).
PASSIVE_PATHS = frozenset({"/health", "/info", "/metrics", "/docs", "/redoc", "/openapi.json",
                           "/docs/oauth2-redirect"})
WAKE_TIMEOUT = 600.0  # seconds a request waits for a waking model; openai-python's default timeout too
_LOADING = (PENDING, INITIALIZING, SCALED_TO_ZERO)  # statuses in which a request waits for the model

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


class _CapacityLogSaidByNotes(logging.Filter):
    """While this thread builds an endpoint's engine, the engine's log records of lowered limits are left out:
    the endpoint's notes say them (named as the user set them) as EndpointWarnings, and in a kernel, where
    nothing configures logging, Python's last-resort handler would print each one a second time. Records of
    other threads (another engine loading meanwhile) pass."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.thread or not getattr(record, "capacity_lowering", False)

    def __enter__(self) -> "_CapacityLogSaidByNotes":
        logging.getLogger("tgi_nb").addFilter(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger("tgi_nb").removeFilter(self)


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
    """The life cycle of a local endpoint: one :class:`~tgi_nb.endpoints.status.StatusMachine`, driven here.

    ``machine`` is the endpoint's own (a kernel-thread backend passes the one its ``InferenceEndpoint``
    forwards, so a change made here reaches the subscribers directly); None makes one (a child process).
    Every move is made by one of its methods: the first load and each reload (``track_loads`` wraps the
    server's engine factory: pending -> initializing, then running or failed with the error once the server's
    engine holder has the engine), ``pause``, ``resume`` (loads a paused, scaled-to-zero or failed model),
    ``scale_to_zero``, ``wake`` (what a request or ``wait()`` does: loads a scaled-to-zero model) and the idle
    watch (``scale_to_zero_after``). An action that :func:`~tgi_nb.endpoints.status.allowed_actions` does not
    list for the current status does nothing. A model freed while it still loads is freed once loaded, unless
    a resume or a request wanted it in between. Once closed (the endpoint restarted elsewhere, or deleted), it
    moves the machine no more.

    Example:
        >>> ctl = EndpointController(Notes())
        >>> ctl.status
        'pending'
        >>> app = build_app(ctl.track_loads(load_engine), settings)   # doctest: +SKIP
        >>> ctl.attach(app.state.holder)                               # doctest: +SKIP
    """

    def __init__(self, notes: Notes, *, scale_to_zero_after: Optional[float] = None,
                 machine: Optional[StatusMachine] = None):
        self.notes = notes
        self.machine = machine if machine is not None else StatusMachine(owner="local endpoint")
        self.holder: Any = None
        self.in_flight = 0
        self.last_activity = time.monotonic()
        self.scale_to_zero_after = scale_to_zero_after
        self._lock = threading.RLock()
        self._closed = threading.Event()

    @property
    def status(self) -> str:
        return self.machine.status

    @property
    def paused(self) -> bool:
        return self.machine.status == PAUSED

    def attach(self, holder: Any) -> None:
        """Drive ``holder`` (the server's ``app.state.holder``), whose factory came from :meth:`track_loads`."""
        self.holder = holder
        if self.scale_to_zero_after:
            threading.Thread(target=self._idle_watch, name="tgi_nb-endpoint-idle", daemon=True).start()

    def track_loads(self, factory: Callable[[], Any]) -> Callable[[], Any]:
        """``factory`` reporting each load to this controller (it runs in the holder's loader thread)."""

        def load() -> Any:
            with self._lock:
                if self.machine.status == PENDING:
                    self.machine.move(INITIALIZING)
            threading.Thread(target=self._await_load, name="tgi_nb-endpoint-load", daemon=True).start()
            return factory()

        return load

    def _await_load(self) -> None:
        loaded = self.holder.wait()  # set once the holder has the engine, or the error
        with self._lock:
            if self._closed.is_set():  # a restart took the machine over meanwhile
                return
            status = self.machine.status
            if loaded and status in (PAUSED, SCALED_TO_ZERO):  # freed while it loaded
                self.holder.unload()
            elif status == INITIALIZING:
                self.machine.move(RUNNING if loaded else FAILED, None if loaded else self.holder.error)
                if loaded:  # the idle time before scaling to zero counts from here, as for a new replica
                    self.last_activity = time.monotonic()

    def state(self) -> dict[str, Any]:
        """``{"status", "message", "changed_at", "warnings", "limits"}``; ``limits`` once a model is loaded;
        ``changed_at``: the machine's ``time.monotonic()`` at its last change of status, which orders two answers
        (a parent applies none older than the one it holds)."""
        engine = self.holder.engine if self.holder is not None else None
        limits = None
        if engine is not None:
            limits = {"max_input_tokens": engine.max_input_tokens, "max_total_tokens": engine.max_total_tokens,
                      "max_batch_total_tokens": engine.config.max_batch_total_tokens,
                      "device": engine.config.device, "dtype": engine.config.dtype,
                      "kv_cache_dtype": engine.config.kv_cache_dtype, "kv_cache_bytes": engine.capacity.kv_cache_bytes,
                      "weights_bytes": engine.weights_bytes}
        return {"status": self.machine.status, "message": self.machine.message,
                "changed_at": self.machine.changed_at, "warnings": self.notes.list(), "limits": limits}

    def _allows(self, action: str) -> bool:
        return not self._closed.is_set() and action in allowed_actions(self.machine.status)

    def pause(self) -> None:
        with self._lock:
            if self._allows("pause"):
                self.machine.move(PAUSED)
                self._free()

    def resume(self) -> None:
        with self._lock:
            if self._allows("resume"):
                self._load()

    def scale_to_zero(self) -> None:
        with self._lock:
            if self._allows("scale_to_zero"):
                self.machine.move(SCALED_TO_ZERO)
                self._free()

    def wake(self) -> None:
        """Load a model freed by scale-to-zero again: what a request (or ``wait()``) does."""
        with self._lock:
            if self.machine.status == SCALED_TO_ZERO:
                self._load()

    def _load(self) -> None:
        self.machine.move(INITIALIZING)
        if self.holder.status == "loading":  # freed while it loaded: _await_load now keeps it
            return
        if self.holder.status == "ready":  # the engine was never freed (a pause during a failed unload...)
            self.machine.move(RUNNING)
            return
        self.holder.start()

    def _free(self) -> None:
        if self.holder.status != "loading":  # else _await_load frees it once loaded
            self.holder.unload()

    def close(self) -> None:
        with self._lock:  # a move in progress ends first; none follows
            self._closed.set()

    def _idle_watch(self) -> None:
        after = float(self.scale_to_zero_after or 0)
        interval = max(0.1, min(30.0, after / 4))
        ready_since = None
        while not self._closed.wait(interval):
            with self._lock:
                running = self.machine.status == RUNNING and not self._closed.is_set()
                # Idle time counts from the later of the last request and the model becoming ready: a load that
                # took longer than the timeout must not be freed the moment it finishes, before anyone used it.
                ready_since = (ready_since or time.monotonic()) if running else None
                idle = time.monotonic() - max(self.last_activity, ready_since or 0.0)
                if running and self.in_flight == 0 and idle >= after:
                    logger.info("no request for %.0f s: scaling to zero", idle)
                    self.machine.move(SCALED_TO_ZERO)
                    self._free()

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
                 accepted_key_digests: tuple[str, ...] = (), control_token: Optional[str] = None,
                 wake_timeout: float = WAKE_TIMEOUT):
        self.app = app
        self.controller = controller
        self.api_key = api_key
        self.accepted_key_digests = accepted_key_digests
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
            if path == "/health" and ctl.status != RUNNING:
                # huggingface_hub's status words, so that connect() from elsewhere reads the same life cycle; a
                # failure's text (local paths...) stays with the endpoint's owner: /health needs no key.
                message = ("the endpoint failed; its status message and log, where it runs, say why"
                           if ctl.status == FAILED else ctl.machine.message)
                await _json(send, 503, {"error": message or f"the endpoint is {ctl.status}",
                                        "error_type": "healthcheck", "status": ctl.status})
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
            if ctl.status in _LOADING and self._authorized(scope):
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
            check_bearer(authorization, self.api_key, self.accepted_key_digests)
        except Unauthorized:
            return False
        return True

    async def _wait_ready(self) -> None:
        """Until the model is loaded (or failed, or paused): told by the machine, not by polling it."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()

        def changed(_owner: Any, _previous: str, new: str) -> None:
            if new not in _LOADING:
                try:
                    loop.call_soon_threadsafe(ready.set)
                except RuntimeError:  # the server's loop closed meanwhile: nobody waits any more
                    pass

        unsubscribe = self.controller.machine.subscribe(changed)
        try:
            if self.controller.status in _LOADING:
                await asyncio.wait_for(ready.wait(), self.wake_timeout)
        except asyncio.TimeoutError:
            pass  # the request goes on and gets the server's own 503
        finally:
            unsubscribe()

    async def _status_other_than(self, status: str, timeout: float) -> None:
        """Until the machine's status is not ``status``, at most ``timeout`` seconds: told by the machine."""
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def on_change(_owner: Any, _previous: str, new: str) -> None:
            if new != status:
                try:
                    loop.call_soon_threadsafe(changed.set)
                except RuntimeError:  # the server's loop closed meanwhile
                    pass

        unsubscribe = self.controller.machine.subscribe(on_change)
        try:
            if self.controller.status == status:  # checked after subscribing: no change falls between the two
                await asyncio.wait_for(changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            unsubscribe()

    async def _control(self, scope, receive, send, action: str) -> None:
        token = dict(scope["headers"]).get(CONTROL_HEADER.encode(), b"").decode("latin-1")
        if not hmac.compare_digest(token.encode(), (self.control_token or "").encode()):
            await _json(send, 403, {"error": "control token missing or wrong", "error_type": "authentication"})
            return
        ctl = self.controller
        actions: dict[str, Callable[[], None]] = {"pause": ctl.pause, "resume": ctl.resume,
                                                  "scale_to_zero": ctl.scale_to_zero}
        if scope["method"] == "GET" and action == "state":
            # ?while=<status>[&timeout=<s>]: answered once the status is another (or after the timeout).
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            if "while" in query:
                try:
                    timeout = min(max(float(query.get("timeout", ["30"])[0]), 0.0), STATE_WAIT_MAX)
                except ValueError:
                    await _json(send, 400, {"error": "timeout: expected seconds", "error_type": "validation"})
                    return
                await self._status_other_than(query["while"][0], timeout)
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
                       api_key: Optional[str] = None, accepted_key_digests: tuple[str, ...] = (),
                       accelerator: Optional[str] = None, scale_to_zero_after: Optional[float] = None, control_token: Optional[str] = None,
                       wake_timeout: float = WAKE_TIMEOUT, machine: Optional[StatusMachine] = None,
                       files_dir: Optional[str] = None) -> ControlledApp:
    """The server app for one endpoint, configured as ``text-generation-launcher`` would be by ``env`` (TGI's
    variable names, read from this dict only, never from the process environment) and ``args`` (its flags).

    Settings that contradict each other raise ``LaunchError`` here; the model loads when the app starts (in the
    server's loader thread), and its limits are fitted to the model and memory as it loads. ``files_dir`` holds
    /v1/files and the Batch API's records unless ``FILES_DIR`` says otherwise (None: a temporary folder removed
    when the server stops). ``machine``: the endpoint's status machine, which the app's controller drives (None:
    its own). ``accepted_key_digests``: SHA-256 digests of further bearer keys accepted beside ``api_key``.

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
    opts["files_dir"] = opts["files_dir"] or files_dir  # FILES_DIR wins; None: a folder removed with the server
    choose_device(opts, accelerator, notes)
    # Validates every option now; the engine's capacity planner fits the limits to the model and memory.
    settings = plan_from_options(opts, fit_limits=True).settings
    settings.accepted_key_digests = tuple(accepted_key_digests)

    def load_engine() -> Any:
        with _CapacityLogSaidByNotes():
            engine = plan_from_options(opts, fit_limits=True).engine_factory()
        note_capacity(engine, notes, env=env, args=args)
        return engine

    controller = EndpointController(notes, scale_to_zero_after=scale_to_zero_after, machine=machine)
    app = build_app(controller.track_loads(load_engine), settings)
    controller.attach(app.state.holder)
    controlled = ControlledApp(app, controller, api_key=api_key, accepted_key_digests=settings.accepted_key_digests,
                               control_token=control_token, wake_timeout=wake_timeout)
    app.state.batches.app = controlled  # batch lines wait while paused and wake a scaled-to-zero model, as requests do
    return controlled
