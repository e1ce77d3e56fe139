"""The backends of a server that runs elsewhere: a URL (:class:`RemoteBackend`) or a Hugging Face Inference
Endpoint (:class:`HubBackend`). Both check the status (every ``watch_every`` seconds while anyone subscribes)
and record it in the endpoint's machine; neither drives it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

from .backends import PROBE_TIMEOUT, REQUEST_TIMEOUT, Backend, BackendState
from .discovery import ServerInfo, discover, health_status
from .status import RUNNING


class RemoteBackend(Backend):
    """A server that runs elsewhere, given by its URL: TGI, vLLM, llama.cpp, another tgi_nb, a Hugging Face
    Inference Endpoint's URL.

    The status comes from its health route (see :func:`~tgi_nb.endpoints.discovery.health_status`); what it
    serves from whichever of ``/info``, ``/props`` and ``/v1/models`` it has, asked again each time it starts
    running. Life-cycle actions raise :class:`RemoteEndpointError`: it is managed where it runs.
    """

    kind = "remote"

    def __init__(self, url: str, token: Optional[str], health_route: str = "/health", name: str = "remote",
                 timeout: float = REQUEST_TIMEOUT):
        super().__init__(name, token)
        self._url = url
        self.health_route = health_route
        self.request_timeout = timeout
        self.info = ServerInfo()
        self._was_running = False

    @property
    def url(self) -> str:
        return self._url

    @property
    def repository(self) -> str:
        return self.info.model_id or "unknown"

    def _client(self):
        import httpx

        return httpx.Client(base_url=self._url, headers=self.headers(), follow_redirects=True,
                            timeout=min(self.request_timeout, PROBE_TIMEOUT))

    def _check(self) -> BackendState:
        with self._client() as client:
            status, message = health_status(client, self.health_route)
            if status == RUNNING and not self._was_running:  # (re)started: what it serves may have changed
                self.info = discover(client)
        self._was_running = status == RUNNING
        return BackendState(status, message, warnings=self.info.warnings(self._url), limits=self.info.limits or None,
                            server=self.info.kind)

    def raw(self, *, status: str, message: Optional[str], created_at: datetime, updated_at: datetime
            ) -> dict[str, Any]:
        return {
            "name": self.name, "type": "authenticated" if self.token else "public",
            "model": {"repository": self.repository, "revision": "main", "task": "text-generation",
                      "framework": "custom", "image": {"remote": {"url": self._url}}, "env": {}, "secrets": {}},
            "healthRoute": self.health_route,
            "status": {"state": status, "url": self._url, "message": message, "createdAt": created_at.isoformat(),
                       "updatedAt": updated_at.isoformat()},
            "tgi_nb": {},
        }


class HubBackend(Backend):
    """A ``huggingface_hub.InferenceEndpoint``: status, ``raw``, pause, resume, scale to zero, update and
    delete go through huggingface_hub (its API, with the object's token); requests go to its URL with that
    token. What the server serves and its limits are asked of the server itself, as for a URL.

    As huggingface_hub does, nothing reaches the Hub while ``HF_HUB_OFFLINE`` is set: ``fetch()`` and the
    actions raise its ``OfflineModeIsEnabled`` then.
    """

    kind = "huggingface_hub"

    def __init__(self, endpoint: Any, timeout: float = REQUEST_TIMEOUT):
        from huggingface_hub.utils import get_token_to_send

        token = endpoint._token
        token = get_token_to_send(token) if token in (None, True) else (token or None)
        super().__init__(endpoint.name, token)
        self.hub = endpoint
        self.request_timeout = timeout
        self._server: Optional[RemoteBackend] = None

    @property
    def url(self) -> Optional[str]:
        url = self.hub.url
        return url.rstrip("/") if url else None

    @property
    def repository(self) -> str:
        return self.hub.repository

    def _server_state(self) -> Optional[BackendState]:
        """The server's own answer once the Hub says it runs (its kind and limits); None before."""
        url = self.url
        if self.hub.status != RUNNING or not url:
            return None
        if self._server is None or self._server.url != url:
            self._server = RemoteBackend(url, self.token, self.hub.health_route or "/health", self.name,
                                         self.request_timeout)
        return self._server._check()

    def _check(self) -> BackendState:
        self.hub.fetch()
        message = (self.hub.raw.get("status") or {}).get("message")
        server = self._server_state()
        return BackendState(getattr(self.hub.status, "value", self.hub.status), message,
                            limits=server.limits if server else None, server=server.server if server else None)

    def last_known_state(self) -> BackendState:
        # The object's own: connect() works offline, and an action already brought the Hub's answer back.
        return self._record(BackendState(getattr(self.hub.status, "value", self.hub.status),
                                         (self.hub.raw.get("status") or {}).get("message")))

    def raw(self, *, status: str, message: Optional[str], created_at: datetime, updated_at: datetime
            ) -> dict[str, Any]:
        return {**self.hub.raw, "tgi_nb": {}}  # the Hub's own dates and status: it is the truth here

    def pause(self) -> None:
        self.hub.pause()

    def resume(self, running_ok: bool = True) -> None:
        self.hub.resume(running_ok=running_ok)

    def scale_to_zero(self) -> None:
        self.hub.scale_to_zero()

    def update(self, changes: dict[str, Any]) -> "HubBackend":
        import inspect

        accepted = set(inspect.signature(self.hub.update).parameters)
        unknown = sorted(k for k, v in changes.items() if v is not None and k not in accepted)
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: huggingface_hub's InferenceEndpoint.update does not take "
                             f"{'it' if len(unknown) == 1 else 'them'}; it takes {', '.join(sorted(accepted))}")
        self.hub.update(**{k: v for k, v in changes.items() if v is not None})
        return self

    def delete(self) -> None:
        self.hub.delete()
        self.close()
