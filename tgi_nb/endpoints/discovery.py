"""What a server we did not start is: which software, which model, which limits, and how healthy.

Each kind of server describes itself on its own route: TGI (and tgi_nb) on ``/info``, llama.cpp's
``llama-server`` on ``/props``, vLLM (and most OpenAI-compatible servers) on ``/v1/models``. :func:`discover`
asks each route once; a route that is missing (404), refuses (401, 405), times out or answers something that
is not JSON is skipped quietly, so the answer is whatever the server tells. Every request has a timeout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import httpx

from .status import FAILED, INITIALIZING, PENDING, RUNNING, TRANSITIONS

#: What :attr:`ServerInfo.kind` can be.
SERVER_KINDS = ("tgi_nb", "tgi", "vllm", "llama.cpp", "openai-compatible", "unknown")
LIMIT_KEYS = ("max_input_tokens", "max_total_tokens", "max_batch_total_tokens")


@dataclass
class ServerInfo:
    """What :func:`discover` learnt: ``kind`` (one of :data:`SERVER_KINDS`), the served ``model_id``, the
    ``limits`` it announces (TGI's names), the JSON of each route that answered (``routes``), and the routes
    that refused the token (``refused``: HTTP 401 or 403)."""

    kind: str = "unknown"
    model_id: Optional[str] = None
    limits: dict[str, int] = field(default_factory=dict)
    routes: dict[str, Any] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)

    def warnings(self, url: str) -> list[str]:
        """What the user should hear about: a token the server refused."""
        if not self.refused:
            return []
        return [f"{url} refused the token on {', '.join(self.refused)} (HTTP 401/403): requests will fail until "
                f"connect() gets the server's key as token=..."]


def _json(client: httpx.Client, path: str, found: ServerInfo) -> Optional[Any]:
    try:
        response = client.get(path)
    except httpx.HTTPError:
        return None
    if response.status_code in (401, 403):
        found.refused.append(path)
    if response.status_code != 200:
        return None
    try:
        return response.json()
    except ValueError:  # an HTML page, a proxy's error text...
        return None


def discover(client: httpx.Client) -> ServerInfo:
    """Ask ``/info``, ``/props`` and ``/v1/models`` of the server behind ``client`` (its ``base_url``,
    headers and timeout) what it is.

    Example:
        >>> with httpx.Client(base_url="http://127.0.0.1:8080", timeout=5) as client:   # doctest: +SKIP
        ...     discover(client)
        ServerInfo(kind='llama.cpp', model_id='SmolLM2-135M-Instruct.Q4_1.gguf', limits={'max_total_tokens': 1024}, ...)
    """
    found = ServerInfo()
    info = _json(client, "/info", found)
    if isinstance(info, dict) and info.get("model_id"):
        found.routes["/info"] = info
        found.kind = "tgi_nb" if info.get("router") == "tgi_nb" else "tgi"
        found.model_id = info["model_id"]
        found.limits = {k: info[k] for k in LIMIT_KEYS if isinstance(info.get(k), int)}
        return found
    props = _json(client, "/props", found)
    if isinstance(props, dict) and ("default_generation_settings" in props or "build_info" in props):
        found.routes["/props"] = props
        found.kind = "llama.cpp"
        settings = props.get("default_generation_settings") or {}
        n_ctx = settings.get("n_ctx") or props.get("n_ctx")
        if isinstance(n_ctx, int):  # the context of one slot: what one request may use
            found.limits["max_total_tokens"] = n_ctx
    models = _json(client, "/v1/models", found)
    entries = models.get("data") if isinstance(models, dict) else None
    if isinstance(entries, list) and entries and isinstance(entries[0], dict):
        found.routes["/v1/models"] = models
        first = entries[0]
        found.model_id = found.model_id or first.get("id")
        if found.kind == "unknown":
            owner = first.get("owned_by")
            found.kind = ("vllm" if owner == "vllm" or "max_model_len" in first
                          else "llama.cpp" if owner == "llamacpp" else "openai-compatible")
        if isinstance(first.get("max_model_len"), int):
            found.limits.setdefault("max_total_tokens", first["max_model_len"])
    if found.model_id is None and found.kind == "llama.cpp":
        path = (props or {}).get("model_path") or ""
        found.model_id = path.rsplit("/", 1)[-1] or None
    return found


def health_status(client: httpx.Client, health_route: str) -> tuple[str, Optional[str]]:
    """The status a server's health route implies, and why when it is not running.

    200: running. 503: initializing, or the status a tgi_nb endpoint names in its body (huggingface_hub's
    values). 401/403: failed, the token was refused. No answer within the client's timeout, or no
    connection: pending. Servers without a health route (404, 405) are asked ``/v1/models`` instead.

    Example:
        >>> with httpx.Client(base_url="http://127.0.0.1:1", timeout=1) as client:
        ...     health_status(client, "/health")[0]
        'pending'
    """
    base = str(client.base_url).rstrip("/")
    try:
        response = client.get(health_route)
        if response.status_code in (404, 405):  # Ollama, some proxies: no health route
            health_route = "/v1/models"
            response = client.get(health_route)
    except httpx.TimeoutException:
        return PENDING, f"{base}{health_route} did not answer within {client.timeout.read} s"
    except httpx.HTTPError as exc:
        return PENDING, f"cannot reach {base}: {type(exc).__name__}: {exc}"
    code = response.status_code
    if code == 200:
        return RUNNING, None
    if code in (401, 403):
        return FAILED, f"{base} refused the token (HTTP {code}): pass token= to connect()"
    if code == 503:
        try:
            body = response.json()
        except ValueError:
            body = None
        body = body if isinstance(body, dict) else {}
        status = body.get("status")
        if status in TRANSITIONS and status != RUNNING:
            return status, body.get("error") if isinstance(body.get("error"), str) else None
        return INITIALIZING, None
    return FAILED, f"{base}{health_route} answered HTTP {code}: {response.text[:200]}"
