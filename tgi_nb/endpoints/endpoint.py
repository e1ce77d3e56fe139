"""``InferenceEndpoint``, as in ``huggingface_hub``, and the registry of this kernel's endpoints.

The object has huggingface_hub's fields (name, namespace, repository, status, health_route, url, framework,
revision, task, created_at, updated_at, type, raw) and methods (wait, fetch, update, pause, resume,
scale_to_zero, delete, client, async_client), plus ``on_status_change``. As there, the fields are a snapshot:
every method refreshes them, and ``fetch()`` does so explicitly. What differs between a server in this kernel,
in a child process, at a URL or on Hugging Face is in :mod:`~tgi_nb.endpoints.backends`, not here; the
functions that make endpoints (``create_inference_endpoint``, ``connect``...) are in
:mod:`~tgi_nb.endpoints.api`.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Optional

from huggingface_hub.errors import InferenceEndpointError, InferenceEndpointTimeoutError

from ..progress import progress_bar
from .backends import PROBE_TIMEOUT, Backend, BackendState
from .hub_session import allow_loopback_when_offline, is_loopback
from .spec import EndpointRequest, utcnow
from .status import DELETED, FAILED, RUNNING, UPDATE_FAILED, StatusMachine

if TYPE_CHECKING:
    from huggingface_hub import AsyncInferenceClient, InferenceClient

logger = logging.getLogger("tgi_nb.endpoints")

NAMESPACE = "local"
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REDRAW_EVERY = 1.0  # seconds between two redraws of wait()'s progress bar while the status does not change


class EndpointWarning(UserWarning):
    """The endpoint was adapted to this machine: a limit lowered to what fits, a GPU that is not there..."""


class InferenceEndpointNotFoundError(InferenceEndpointError, LookupError):
    """No endpoint of that name in this kernel."""


def _warn(message: str) -> None:
    # Point the warning at the user's code (the notebook cell), not at tgi_nb's internals.
    frame, level = sys._getframe(0), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, EndpointWarning, stacklevel=level)


def _progress_bar(desc: str):
    return progress_bar(desc, bar_format="{desc} [{elapsed}]", mininterval=1.0, leave=True)


@dataclass
class InferenceEndpoint:
    """An endpoint served by tgi_nb or reached through it, with the fields and methods of
    ``huggingface_hub.InferenceEndpoint``.

    Local endpoints (``create_inference_endpoint``) run in a kernel thread (``backend="thread"``, the default) or
    a child process (``backend="process"``); remote ones (``connect(url)``, ``connect(hf_endpoint)``) are served
    elsewhere. Statuses are huggingface_hub's: pending, initializing, running, paused, scaledToZero, failed (and
    "deleted" after ``delete()``); ``on_status_change`` reports every change. ``url`` is None until a local
    endpoint first runs, then ``http://127.0.0.1:PORT`` without a trailing slash; ``browser_url`` is what a
    browser uses (Binder, Colab...).

    Example:
        >>> from tgi_nb import create_inference_endpoint
        >>> endpoint = create_inference_endpoint("demo", repository="HuggingFaceTB/SmolLM2-135M-Instruct",
        ...                                      type="public")                                # doctest: +SKIP
        >>> endpoint.wait().status                                                           # doctest: +SKIP
        'running'
        >>> endpoint.client.chat_completion([{"role": "user", "content": "Hi"}], max_tokens=8)  # doctest: +SKIP
        >>> endpoint.scale_to_zero().status                                                  # doctest: +SKIP
        'scaledToZero'
        >>> endpoint.delete()                                                                # doctest: +SKIP
    """

    # Fields in __repr__, as huggingface_hub's
    name: str = field(init=False)
    namespace: str
    repository: str = field(init=False)
    status: str = field(init=False)
    health_route: str = field(init=False)
    url: Optional[str] = field(init=False)

    # Other fields
    framework: str = field(repr=False, init=False)
    revision: str = field(repr=False, init=False)
    task: str = field(repr=False, init=False)
    created_at: datetime = field(repr=False, init=False)
    updated_at: datetime = field(repr=False, init=False)
    type: str = field(repr=False, init=False)

    raw: dict = field(repr=False)

    _token: Optional[str] = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._populate_from_raw()

    # ------------------------------------------------------------------------------------------------ building
    @classmethod
    def _serving(cls, backend: Backend, namespace: str) -> "InferenceEndpoint":
        """An endpoint on ``backend``, its fields from what the backend knows without waiting."""
        now = utcnow()
        state = backend.last_known_state()
        raw = backend.raw(status=state.status, message=state.message, created_at=now, updated_at=now)
        endpoint = cls(namespace=namespace, raw=raw, _token=backend.token)
        endpoint._backend = backend
        endpoint._created = endpoint._updated = now
        endpoint._server_kind = None
        endpoint._deleted = False
        endpoint._warned = set()
        endpoint._lock = threading.RLock()
        endpoint._refresh(state)
        return endpoint

    def _populate_from_raw(self) -> None:
        # As huggingface_hub reads its API's answer.
        raw = self.raw
        self.name = raw["name"]
        self.repository = raw["model"]["repository"]
        self.status = raw["status"]["state"]
        self.url = raw["status"].get("url")
        self.health_route = raw["healthRoute"]
        self.framework = raw["model"]["framework"]
        self.revision = raw["model"]["revision"]
        self.task = raw["model"]["task"]
        self.created_at = _parse_datetime(raw["status"]["createdAt"])
        self.updated_at = _parse_datetime(raw["status"]["updatedAt"])
        self.type = raw["type"]

    # ------------------------------------------------------------------------------------------------ state
    @property
    def _machine(self) -> StatusMachine:
        """The endpoint's one status machine: its backend's (driven by the server's controller in this kernel,
        recorded from status checks otherwise); a restarted local server keeps it."""
        return self._backend.machine

    @property
    def backend(self) -> str:
        """Where the server runs: ``"thread"`` (this kernel), ``"process"`` (a child process), ``"remote"`` (a
        URL given to ``connect()``) or ``"huggingface_hub"`` (a Hugging Face Inference Endpoint)."""
        return self._backend.kind

    @property
    def is_remote(self) -> bool:
        """True when the server runs elsewhere (``connect()``): it is managed there, not from this kernel."""
        return not self._backend.local

    @property
    def server_kind(self) -> Optional[str]:
        """Which software answers: "tgi_nb", "tgi", "vllm", "llama.cpp", "openai-compatible" or "unknown"; None
        until a remote server was first seen running.

        Example:
            >>> connect("http://127.0.0.1:8081").wait().server_kind      # doctest: +SKIP
            'llama.cpp'
        """
        return self._server_kind

    @property
    def browser_url(self) -> Optional[str]:
        """The URL a browser uses for this endpoint (JupyterHub/Binder proxy path, Colab proxy URL, or ``url``);
        None until the server listens.

        Example:
            >>> endpoint.browser_url + "/docs"          # doctest: +SKIP
            '/user/ada/proxy/41234/docs'
        """
        return None if self._deleted else self._backend.browser_url()

    @property
    def limits(self) -> Optional[dict[str, Any]]:
        """The limits the server runs with once a model is loaded (``max_input_tokens``, ``max_total_tokens``,
        ``max_batch_total_tokens``...): what the cookbook's ``context_window`` should be. None before; for a
        remote server, what its ``/info``, ``/props`` or ``/v1/models`` announce."""
        return self.raw.get("tgi_nb", {}).get("limits")

    def _refresh(self, state: Optional[BackendState] = None, *, show_warnings: bool = True) -> None:
        with self._lock:
            if self._deleted:
                return
            backend = self._backend
            state = state or backend.state()  # recorded in the machine by the backend
            if state.status != self.status:
                self._updated = utcnow()
            if state.server:
                self._server_kind = state.server
            self._token = backend.token
            self.raw = backend.raw(status=state.status, message=state.message, created_at=self._created,
                                   updated_at=self._updated)
            extra = self.raw.setdefault("tgi_nb", {})
            extra.update(backend=backend.kind, port=backend.port, limits=state.limits, server=self._server_kind,
                         warnings=list(state.warnings), **backend.details())
            self._populate_from_raw()
            # Warned in the user's own thread only: from a widget's or the notifier's thread a warning has no cell
            # to point at (Python names threading.py) and shows in whatever cell runs; widgets list them anyway.
            show_warnings = show_warnings and threading.current_thread() is threading.main_thread()
            new = [w for w in state.warnings if w not in self._warned] if show_warnings else []
            self._warned.update(new)
        for message in new:
            _warn(message)

    def _check_alive(self) -> None:
        if self._deleted:
            raise InferenceEndpointError(f"Inference Endpoint {self.name} was deleted.")

    def on_status_change(self, callback: Callable[["InferenceEndpoint", str, str], None]) -> Callable[[], None]:
        """Call ``callback(endpoint, previous_status, new_status)`` on every change of status, from a background
        thread (the status machine's notifier: never the engine's, never the caller's); returns a function that
        stops the calls. The endpoint's fields are refreshed before each call.

        A local endpoint pushes each change as its controller makes it (a child process's through a long poll
        it answers on a change): nothing polls. A remote server is checked every 5 s while anyone listens, in
        one thread of the backend, besides the changes the endpoint's own methods make. An exception in a callback is
        logged and changes nothing else.

        Example:
            >>> unsubscribe = endpoint.on_status_change(
            ...     lambda e, old, new: print(f"{e.name}: {old} -> {new}"))      # doctest: +SKIP
            >>> endpoint.pause()                                               # doctest: +SKIP
            demo: running -> paused
            >>> unsubscribe()                                                  # doctest: +SKIP
        """
        if not callable(callback):
            raise TypeError(f"callback: expected a callable (endpoint, previous, new), got {type(callback).__name__}")

        def forward(_owner: Any, previous: str, new: str) -> None:
            try:
                # The backend's last word, without a slow question for a Hugging Face endpoint; warnings stay
                # for the user's next call to show.
                self._refresh(self._backend.last_known_state(), show_warnings=False)
            except Exception as exc:  # noqa: BLE001 - a server gone: the callback still hears of the change
                logger.debug("refreshing %s failed: %s", self.name, exc)
            callback(self, previous, new)

        return self._backend.subscribe(forward)

    # ------------------------------------------------------------------------------------------------ clients
    @property
    def client(self) -> "InferenceClient":
        """A ``huggingface_hub.InferenceClient`` for this endpoint (``base_url``, the endpoint's token, and a
        timeout: 600 s by default, ``connect(timeout=...)`` for a remote one).

        Raises ``InferenceEndpointError`` while the endpoint has no URL yet (call ``wait()`` first).

        Example:
            >>> endpoint.client.chat_completion([{"role": "user", "content": "Hi"}], max_tokens=16)  # doctest: +SKIP
        """
        from huggingface_hub import InferenceClient

        return InferenceClient(base_url=self._client_url(), token=self._token, timeout=self._backend.request_timeout)

    @property
    def async_client(self) -> "AsyncInferenceClient":
        """An ``huggingface_hub.AsyncInferenceClient`` for this endpoint.

        Example:
            >>> await endpoint.async_client.chat_completion([{"role": "user", "content": "Hi"}])  # doctest: +SKIP
        """
        from huggingface_hub import AsyncInferenceClient

        return AsyncInferenceClient(base_url=self._client_url(), token=self._token,
                                    timeout=self._backend.request_timeout)

    @property
    def token(self) -> Optional[str]:
        """The bearer token this endpoint's clients send (``api_key=endpoint.token`` for the OpenAI client): for a
        protected local endpoint created without ``token=``, a random one made for it; None for a public one.

        Example:
            >>> OpenAI(base_url=endpoint.url + "/v1/", api_key=endpoint.token)     # doctest: +SKIP
        """
        return self._token

    def _client_url(self) -> str:
        if self.url is None:
            raise InferenceEndpointError(
                "Cannot create a client for this Inference Endpoint as it is not yet deployed. "
                "Please wait for the Inference Endpoint to be deployed using `endpoint.wait()` and try again.")
        if is_loopback(self.url):
            allow_loopback_when_offline()  # HF_HUB_OFFLINE would block even 127.0.0.1, which is not the Hub
        return self.url

    # ------------------------------------------------------------------------------------------------ methods
    def wait(self, timeout: Optional[float] = None, refresh_every: float = 5) -> "InferenceEndpoint":
        """Block until the endpoint runs and its health route answers 200, showing a progress bar meanwhile.

        Raises ``InferenceEndpointError`` when it failed (the message says why) or, for a local endpoint, when it
        is paused (nothing would resume it); ``InferenceEndpointTimeoutError`` after ``timeout`` seconds, naming
        the URL and the last status. A local endpoint scaled to zero is woken up, as a request would. An
        endpoint in this kernel's thread or a child process is waited for on its status machine (no polling), and
        ``refresh_every`` (seconds) paces the checks of remote ones.

        Example:
            >>> endpoint.wait(timeout=300).status     # doctest: +SKIP
            'running'
        """
        if timeout is not None and timeout < 0:
            raise ValueError("`timeout` cannot be negative.")
        if refresh_every <= 0:
            raise ValueError("`refresh_every` must be positive.")
        self._check_alive()
        poll = self._backend.poll_interval(refresh_every)
        start = time.monotonic()
        bar = None
        try:
            while True:
                self.fetch()
                message = self.raw["status"].get("message")
                if self.status in (FAILED, UPDATE_FAILED):
                    verb = "deploy" if self.status == FAILED else "update"
                    raise InferenceEndpointError(f"Inference Endpoint {self.name} failed to {verb}: {message}")
                self._backend.before_poll(self.status, self.name)
                if self.status == RUNNING and self.url is not None and self._healthy():
                    logger.info("Inference Endpoint %s is ready to be used.", self.name)
                    if bar is not None:
                        bar.set_description_str(f"Inference Endpoint {self.name}: running", refresh=False)
                    return self
                if timeout is not None and time.monotonic() - start > timeout:
                    where = self.url or self._backend.server_address()
                    raise InferenceEndpointTimeoutError(
                        f"Timeout while waiting for Inference Endpoint {self.name}"
                        f"{f' ({where})' if where else ''} to be deployed "
                        f"(status: {self.status}{f'; {message}' if message else ''}).")
                if bar is None:
                    bar = _progress_bar(f"Inference Endpoint {self.name}: {self.status}")
                else:
                    bar.set_description_str(f"Inference Endpoint {self.name}: {self.status}", refresh=False)
                    bar.update(0)  # redraws at most every mininterval
                if self._backend.pushes:
                    left = _REDRAW_EVERY if timeout is None else timeout - (time.monotonic() - start)
                    self._machine.wait_change(self.status, max(0.0, min(_REDRAW_EVERY, left)))
                else:
                    time.sleep(poll)
        finally:
            if bar is not None:
                bar.close()

    def _healthy(self) -> bool:
        import httpx

        try:
            response = httpx.get(f"{self.url}/{self.health_route.lstrip('/')}", headers=self._backend.headers(),
                                 timeout=PROBE_TIMEOUT)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def fetch(self) -> "InferenceEndpoint":
        """Refresh the fields from the server (from the Hub for a Hugging Face endpoint); warnings about how it
        was adapted are shown once.

        Example:
            >>> endpoint.fetch().status     # doctest: +SKIP
            'initializing'
        """
        self._check_alive()
        self._refresh()
        return self

    def update(self, *, accelerator: Optional[str] = None, instance_size: Optional[str] = None,
               instance_type: Optional[str] = None, min_replica: Optional[int] = None,
               max_replica: Optional[int] = None, scale_to_zero_timeout: Optional[float] = None,
               scaling_metric: Any = None, scaling_threshold: Optional[float] = None,
               repository: Optional[str] = None, framework: Optional[str] = None, revision: Optional[str] = None,
               task: Optional[str] = None, custom_image: Optional[dict] = None,
               container_command: Optional[list[str]] = None, container_args: Optional[list[str]] = None,
               tensor_parallel_size: Optional[int] = None, data_parallel_size: Optional[int] = None,
               env: Optional[dict[str, str]] = None, secrets: Optional[dict[str, str]] = None,
               domain: Optional[str] = None, path: Optional[str] = None,
               cache_http_responses: Optional[bool] = None, tags: Optional[list[str]] = None
               ) -> "InferenceEndpoint":
        """Change the endpoint, as huggingface_hub's ``update``: arguments left None keep their value. A change
        to what is served (repository, revision, accelerator, custom_image, env, container_args, secrets...)
        restarts a local server on the same port; cloud-only ones (instance, region, replicas...) are recorded.
        A Hugging Face endpoint is updated through huggingface_hub; a URL given to ``connect()`` raises
        ``RemoteEndpointError``.

        Example:
            >>> endpoint.update(env={"MAX_TOTAL_TOKENS": "4096"}).wait()     # doctest: +SKIP
        """
        self._check_alive()
        changes = {k: v for k, v in dict(
            accelerator=accelerator, instance_size=instance_size, instance_type=instance_type,
            min_replica=min_replica, max_replica=max_replica, scale_to_zero_timeout=scale_to_zero_timeout,
            scaling_metric=scaling_metric, scaling_threshold=scaling_threshold, repository=repository,
            framework=framework, revision=revision, task=task, custom_image=custom_image,
            container_command=container_command, container_args=container_args,
            tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size, env=env,
            secrets=secrets, domain=domain, path=path, cache_http_responses=cache_http_responses,
            tags=tags).items() if v is not None}
        with self._lock:
            self._backend = self._backend.update(changes)
            self._refresh(self._backend.last_known_state())
        return self

    def _adopt(self, request: EndpointRequest, kwargs: dict[str, Any]) -> None:
        """Take the arguments of a new ``create_inference_endpoint`` call with this name (local endpoints)."""
        with self._lock:
            self._backend = self._backend.adopt(request, kwargs)
            self._refresh()

    def pause(self) -> "InferenceEndpoint":
        """Free the model and refuse requests (503) until ``resume()``; the port stays this endpoint's. A Hugging
        Face endpoint is paused through huggingface_hub; a URL given to ``connect()`` raises
        ``RemoteEndpointError``.

        Example:
            >>> endpoint.pause().status     # doctest: +SKIP
            'paused'
        """
        self._check_alive()
        self._backend.pause()
        self._refresh(self._backend.last_known_state())
        return self

    def resume(self, running_ok: bool = True) -> "InferenceEndpoint":
        """Load the model again after ``pause()`` (or ``scale_to_zero()``, or a failure); then ``wait()``.

        With ``running_ok=False`` an endpoint that already runs raises ``InferenceEndpointError``.

        Example:
            >>> endpoint.resume().wait().status     # doctest: +SKIP
            'running'
        """
        self._check_alive()
        self._backend.resume(running_ok=running_ok)
        self._refresh(self._backend.last_known_state())
        return self

    def scale_to_zero(self) -> "InferenceEndpoint":
        """Free the model; the next request loads it again and waits for it (as on Hugging Face, where a
        scaled-to-zero endpoint restarts on the next request, with a cold start).

        Example:
            >>> endpoint.scale_to_zero().status     # doctest: +SKIP
            'scaledToZero'
        """
        self._check_alive()
        self._backend.scale_to_zero()
        self._refresh(self._backend.last_known_state())
        return self

    def delete(self) -> None:
        """Stop the server, free the model and the port, and forget the endpoint. A URL given to ``connect()``
        is only forgotten (it keeps running where it is); a Hugging Face endpoint is deleted through
        huggingface_hub. Not reversible: create it again to get it back.

        Example:
            >>> endpoint.delete()     # doctest: +SKIP
        """
        self._release(self._backend.delete)

    def _release(self, how: Optional[Callable[[], None]] = None) -> None:
        """Let go of the endpoint: ``how`` (default: the backend's ``close``, which never deletes anything
        remote) then the status "deleted"."""
        with _REGISTRY_LOCK:
            if _REGISTRY.get(self.name) is self:
                del _REGISTRY[self.name]
        with self._lock:
            if self._deleted:
                return
            (how or self._backend.close)()
            self._deleted = True
            self._updated = utcnow()
            self.raw["status"].update(state=DELETED, url=None, updatedAt=self._updated.isoformat())
            self._populate_from_raw()
            self._machine.observe(DELETED)  # after the fields: subscribers see them deleted


def _parse_datetime(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))  # the Hub writes "...Z", before Python 3.11's parser


# ------------------------------------------------------------------------------------------------------------
# The endpoints of this kernel
# ------------------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, InferenceEndpoint] = {}
_REGISTRY_LOCK = threading.RLock()
# The random tokens made for protected endpoints created without one, by name: kept when the cell runs again.
_LOCAL_TOKENS: dict[str, str] = {}
