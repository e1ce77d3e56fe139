"""Where an endpoint's server runs, behind one interface: :class:`Backend`.

- :class:`ThreadBackend`: a daemon thread of the kernel (``create_inference_endpoint``'s default);
- :class:`ProcessBackend`: a child process (``backend="process"``);
- :class:`RemoteBackend`: a server somewhere else, given by its URL (``connect(url)``): TGI, vLLM, llama.cpp...;
- :class:`HubBackend`: a ``huggingface_hub.InferenceEndpoint`` (``connect(endpoint)``), managed on Hugging Face.

:class:`~tgi_nb.endpoints.endpoint.InferenceEndpoint` only talks to this interface: what differs between the four
(the ``raw`` payload, which life-cycle actions act and which raise, how often to poll) lives here. None of them
blocks the caller for long: models load in the background, and every HTTP request has a timeout.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from huggingface_hub.errors import InferenceEndpointError

from .browser import browser_url
from .discovery import ServerInfo, discover, health_status
from .spec import EndpointRequest, build_request, host_env_for_child
from .status import FAILED, INITIALIZING, PAUSED, PENDING, RUNNING, SCALED_TO_ZERO

logger = logging.getLogger("tgi_nb.endpoints")

#: Seconds a request made through ``endpoint.client`` may take: openai-python's default, and how long a
#: request waits for a scaled-to-zero model to load again.
REQUEST_TIMEOUT = 600.0
#: Seconds one status check of a server elsewhere may take.
PROBE_TIMEOUT = 10.0


class RemoteEndpointError(InferenceEndpointError):
    """An action that only the owner of a remote endpoint can take (pause, resume, scale to zero, update)."""


def loopback_url(host: str, port: int) -> str:
    """The URL kernel-side clients use: ``http://127.0.0.1:PORT`` (no trailing slash) for a wildcard bind too.

    Example:
        >>> loopback_url("0.0.0.0", 8080), loopback_url("::1", 80)
        ('http://127.0.0.1:8080', 'http://[::1]:80')
    """
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass
class BackendState:
    """One status check: huggingface_hub's ``status``, why (``message``), how the server was adapted to this
    machine (``warnings``), its ``limits`` once known, and what kind of ``server`` answers."""

    status: str
    message: Optional[str] = None
    warnings: list[str] = field(default_factory=list)
    limits: Optional[dict[str, Any]] = None
    server: Optional[str] = None


class Backend:
    """What every backend provides; :class:`InferenceEndpoint` stays the same over all of them.

    - ``kind``: "thread", "process", "remote" or "huggingface_hub"; ``local``: whether this kernel runs the
      server (its life-cycle actions act here, a paused one stays paused until ``resume()``);
    - ``url`` (None until clients can use it), ``port``, ``token`` (what clients send), ``request_timeout``;
    - ``state()``, ``raw(...)`` (huggingface_hub's payload), ``poll_interval(refresh_every)``;
    - ``pause``, ``resume``, ``scale_to_zero``, ``update`` (this base raises :class:`RemoteEndpointError`);
    - ``delete()`` (the user's ``endpoint.delete()``) and ``close()`` (this kernel lets go: at exit, or when a
      name is reused), which differ for a Hugging Face endpoint only: ``close()`` never deletes it there.
    """

    kind = "?"
    local = False
    request_timeout = REQUEST_TIMEOUT

    def __init__(self, name: str, token: Optional[str]):
        self.name = name
        self.token = token

    @property
    def url(self) -> Optional[str]:
        raise NotImplementedError

    @property
    def port(self) -> Optional[int]:
        url = self.url
        return urlsplit(url).port if url else None

    @property
    def repository(self) -> str:
        raise NotImplementedError

    def state(self) -> BackendState:
        raise NotImplementedError

    def last_known_state(self) -> BackendState:
        """The state without a slow question: what a Hugging Face endpoint's object already holds (right after
        an action, or offline), a fresh check for the others."""
        return self.state()

    def details(self) -> dict[str, Any]:
        """tgi_nb's own entries of ``raw["tgi_nb"]`` (where a child process logs...)."""
        return {}

    def server_address(self) -> Optional[str]:
        """Where the server is (or will be), for error messages, even before clients may use ``url``."""
        return self.url

    def raw(self, *, status: str, message: Optional[str], created_at: datetime, updated_at: datetime
            ) -> dict[str, Any]:
        """The dict huggingface_hub's API would return for this endpoint now."""
        raise NotImplementedError

    def poll_interval(self, refresh_every: float) -> float:
        """Seconds between two status checks in ``wait()`` and for status subscribers."""
        return refresh_every

    def before_poll(self, status: str, name: str) -> None:
        """What ``wait()`` does about a status that would not change by itself (nothing, here)."""

    def browser_url(self) -> Optional[str]:
        return self.url

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _managed_elsewhere(self, action: str) -> None:
        raise RemoteEndpointError(
            f"Cannot {action} {self.url}: it is a remote endpoint, managed where it runs (the Hugging Face UI or "
            f"huggingface_hub for an Inference Endpoint, its own host for TGI, vLLM or llama.cpp).")

    def _running(self, running_ok: bool) -> bool:
        """Whether ``resume()`` has nothing to do, as huggingface_hub's ``running_ok`` means."""
        if self.state().status != RUNNING:
            return False
        if not running_ok:
            raise InferenceEndpointError(f"Inference Endpoint {self.name} is already running.")
        return True

    def _act(self, action: str) -> None:
        """Pause, resume or scale the server to zero ("pause", "resume", "scale_to_zero")."""
        self._managed_elsewhere(action.replace("_", " "))

    def pause(self) -> None:
        self._act("pause")

    def resume(self, running_ok: bool = True) -> None:
        if not self._running(running_ok):
            self._act("resume")

    def scale_to_zero(self) -> None:
        self._act("scale_to_zero")

    def update(self, changes: dict[str, Any]) -> "Backend":
        """Apply ``update()``'s arguments; returns the backend that serves afterwards (a restarted local server
        is a new one)."""
        self._managed_elsewhere("update")
        return self

    def delete(self) -> None:
        self.close()

    def close(self) -> None:
        pass


class LocalBackend(Backend):
    """A server this kernel runs for a ``create_inference_endpoint`` request (a thread or a child process).

    ``url`` stays None until the model first runs, as on Hugging Face; re-created with other arguments
    (:meth:`adopt`), it restarts on the same port.
    """

    local = True

    def __init__(self, request: EndpointRequest, kwargs: dict[str, Any]):
        super().__init__(request.name, request.token)
        self.request = request
        self.kwargs = kwargs
        self.launch = request.launch
        self._port: Optional[int] = None
        self._ever_running = False

    @staticmethod
    def for_request(request: EndpointRequest, kwargs: dict[str, Any], port: Optional[int]) -> "LocalBackend":
        """A started backend of the kind ``request`` asks for, on ``port`` (None: a free one)."""
        backend_cls = ProcessBackend if request.launch.backend == "process" else ThreadBackend
        backend = backend_cls(request, kwargs)
        backend.start(port)
        return backend

    @property
    def server_url(self) -> Optional[str]:
        """Where the server listens (once it does), running or not."""
        return loopback_url(self.launch.host, self._port) if self._port else None

    @property
    def url(self) -> Optional[str]:
        return self.server_url if self._ever_running else None

    @property
    def port(self) -> Optional[int]:
        return self._port

    @property
    def repository(self) -> str:
        return self.request.repository

    def server_address(self) -> Optional[str]:
        return self.server_url

    def start(self, port: Optional[int] = None) -> None:
        raise NotImplementedError

    def _state(self) -> BackendState:
        raise NotImplementedError

    def state(self) -> BackendState:
        state = self._state()
        if state.status == RUNNING:
            self._ever_running = True
        state.server = "tgi_nb"
        return state

    def raw(self, *, status: str, message: Optional[str], created_at: datetime, updated_at: datetime
            ) -> dict[str, Any]:
        return self.request.raw(state=status, url=self.url, message=message, created_at=created_at,
                                updated_at=updated_at)

    def poll_interval(self, refresh_every: float) -> float:
        return min(refresh_every, 0.1)  # checking costs nothing here

    def before_poll(self, status: str, name: str) -> None:
        if status == PAUSED:
            raise InferenceEndpointError(f"Inference Endpoint {name} is paused: call endpoint.resume() first, "
                                         f"then endpoint.wait().")
        if status == SCALED_TO_ZERO:
            self.resume()  # what the next request would do

    def browser_url(self) -> Optional[str]:
        url = self.server_url
        return browser_url(self._port, url) if url else None

    def update(self, changes: dict[str, Any]) -> "LocalBackend":
        kwargs = {**self.kwargs, **{k: v for k, v in changes.items() if k not in _RECORDED_ONLY}}
        request = build_request(self.name, **kwargs)
        for key in _RECORDED_ONLY:
            if changes.get(key) is not None:
                request.recorded[key] = changes[key]
        return self.adopt(request, kwargs)

    def adopt(self, request: EndpointRequest, kwargs: dict[str, Any]) -> "LocalBackend":
        """Take the arguments of a new create/update call: keep this server when what it serves is unchanged and
        it has not failed (returns self), else stop it and return a new one on the same port."""
        if request.launch == self.launch and self.state().status != FAILED:
            self.request, self.kwargs, self.token = request, kwargs, request.token
            return self
        port = request.launch.port if request.launch.port is not None else self._port
        self.close()
        return LocalBackend.for_request(request, kwargs, port)


# update() arguments that huggingface_hub sends but a local server does not use: recorded in raw only.
_RECORDED_ONLY = ("tensor_parallel_size", "data_parallel_size")


def _wire_state(body: dict[str, Any]) -> BackendState:
    return BackendState(status=body["status"], message=body.get("message"), warnings=list(body.get("warnings") or []),
                        limits=body.get("limits"))


class ThreadBackend(LocalBackend):
    """The server in a daemon thread of this process (the kernel), with its own event loop.

    ``start()`` returns at once: a starter thread imports the server, builds the app and binds the port; the
    model then loads in the server's loader thread. Works with or without ``nest_asyncio`` since nothing here
    touches the caller's event loop.
    """

    kind = "thread"

    def __init__(self, request: EndpointRequest, kwargs: dict[str, Any]):
        super().__init__(request, kwargs)
        self._app: Any = None
        self._server: Any = None
        self._error: Optional[str] = None
        self._stopped = False
        self._built = threading.Event()
        self._starter: Optional[threading.Thread] = None

    def start(self, port: Optional[int] = None) -> None:
        self._starter = threading.Thread(target=self._start, args=(port,), name=f"tgi_nb-start-{self.name}",
                                         daemon=True)
        self._starter.start()

    def _start(self, port: Optional[int]) -> None:
        try:
            from tgi_nb.server import ServerThread

            from .runtime import build_endpoint_app

            launch = self.launch
            app = build_endpoint_app(model_id=launch.model_id, revision=launch.revision, env=launch.env_dict,
                                     args=launch.args, api_key=launch.api_key, accelerator=launch.accelerator,
                                     scale_to_zero_after=launch.scale_to_zero_after)
            server = _bind_server(ServerThread, app, launch.host, port, fixed=launch.port is not None,
                                  notes=app.controller.notes)
            self._port = server.port
            server.start()
            if self._stopped:  # deleted while starting: stop() is waiting for this thread
                server.stop()
                return
            self._app, self._server = app, server
        except BaseException as exc:  # noqa: BLE001 - reported as the endpoint's failed status by wait()
            self._error = f"{type(exc).__name__}: {exc}"
            logger.warning("endpoint %s failed to start: %s", self.name, self._error, exc_info=logger.isEnabledFor(10))
        finally:
            self._built.set()

    def _state(self) -> BackendState:
        if self._error:
            return BackendState(FAILED, self._error)
        if self._server is None:
            return BackendState(PENDING)
        if not self._server.is_alive:
            return BackendState(FAILED, f"the server thread stopped: {self._server.error!r}")
        return _wire_state(self._app.controller.state())

    def _controller(self):
        self._built.wait(120)
        if self._app is None:
            raise InferenceEndpointError(f"Inference Endpoint {self.name} has no running server: "
                                         f"{self._error or 'it is still starting'}")
        return self._app.controller

    def _act(self, action: str) -> None:
        getattr(self._controller(), action)()

    def close(self) -> None:
        self._stopped = True
        if self._starter is not None:
            self._starter.join(120)
        if self._app is not None:
            self._app.controller.close()
        if self._server is not None:
            self._server.stop()
        self._app = self._server = None


def _bind_server(server_cls: Any, app: Any, host: str, port: Optional[int], *, fixed: bool, notes: Any) -> Any:
    """A server on ``port`` (the endpoint's previous one, to keep its URL); when that is taken and the user did
    not ask for it, on a free port instead."""
    try:
        return server_cls(app, host, port or 0, log_level="warning", graceful_shutdown_timeout=2.0)
    except OSError as exc:
        if fixed or not port:
            raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        server = server_cls(app, host, 0, log_level="warning", graceful_shutdown_timeout=2.0)
        notes.add(f"port {port} is taken by another program: this endpoint now listens on {server.port}.")
        return server


class ProcessBackend(LocalBackend):
    """The server in a child process (``python -m tgi_nb.endpoints.serve``, the launcher's settings plus the
    endpoint's controls), terminated on ``stop()``, at interpreter exit, and by itself when this process dies.

    The child writes its port to a file once it answers HTTP; pause, resume and scale-to-zero go through its
    control route, behind a secret only this process knows. Its output goes to ``log_path``.
    """

    kind = "process"

    def __init__(self, request: EndpointRequest, kwargs: dict[str, Any]):
        super().__init__(request, kwargs)
        name = request.name
        self.proc: Optional[subprocess.Popen] = None
        self._control_token = secrets.token_urlsafe(24)
        self._dir = Path(tempfile.mkdtemp(prefix=f"tgi_nb-{name}-"))
        self.log_path = self._dir / "server.log"
        self._port_file = self._dir / "port"
        self._log: Any = None

    def start(self, port: Optional[int] = None) -> None:
        launch = self.launch
        spec = {"model_id": launch.model_id, "revision": launch.revision, "env": launch.env_dict,
                "args": list(launch.args), "api_key": launch.api_key, "accelerator": launch.accelerator,
                "scale_to_zero_after": launch.scale_to_zero_after, "host": launch.host, "port": port or 0,
                "port_fallback": launch.port is None, "control_token": self._control_token,
                "port_file": str(self._port_file), "parent_pid": os.getpid()}
        env = host_env_for_child(launch)
        env["TGI_NB_ENDPOINT_SPEC"] = json.dumps(spec)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self._port_file.unlink(missing_ok=True)
        self._port = None
        self._log = open(self.log_path, "ab")
        # A session of its own: Ctrl-C in a terminal running this kernel does not reach the child; it exits
        # with its parent through its own watchdog instead.
        self.proc = subprocess.Popen([sys.executable, "-m", "tgi_nb.endpoints.serve"], env=env,
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def _read_port(self) -> Optional[int]:
        if self._port is None and self._port_file.exists():
            try:
                self._port = int(self._port_file.read_text())
            except ValueError:  # written atomically, but be safe
                return None
        return self._port

    def details(self) -> dict[str, Any]:
        return {"log_path": str(self.log_path)}

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the child's output."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _exited(self) -> Optional[BackendState]:
        code = self.proc.poll() if self.proc is not None else None
        if code is None:
            return None
        return BackendState(FAILED, f"the server process exited with code {code}; the end of its log:\n"
                                    f"{self.log_tail()}")

    def _state(self) -> BackendState:
        if self.proc is None:
            return BackendState(PENDING)
        if self._read_port() is None:
            return self._exited() or BackendState(PENDING)
        import httpx

        try:
            response = httpx.get(f"{self.server_url}/_tgi_nb/endpoint/state",
                                 headers={"x-tgi-nb-control-token": self._control_token}, timeout=PROBE_TIMEOUT)
            response.raise_for_status()
            return _wire_state(response.json())
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            return self._exited() or BackendState(INITIALIZING, f"the server process does not answer: {exc}")

    def _act(self, action: str) -> None:
        import httpx

        deadline = time.monotonic() + 120
        while self._read_port() is None:
            failed = self._exited()
            if failed or time.monotonic() > deadline:
                raise InferenceEndpointError(f"Inference Endpoint {self.name}: the server process is not up: "
                                             f"{failed.message if failed else 'still starting'}")
            time.sleep(0.1)
        response = httpx.post(f"{self.server_url}/_tgi_nb/endpoint/{action}",
                              headers={"x-tgi-nb-control-token": self._control_token}, timeout=60)
        response.raise_for_status()

    def close(self) -> None:
        running = self.proc is not None and self.proc.poll() is None
        if running:
            self.proc.terminate()  # the child stops its server, which frees the engine
        # Cleaned before waiting: a kernel that shuts down may be killed while the child takes its seconds to
        # exit (it does exit: it got SIGTERM, and it watches this process).
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self._dir, ignore_errors=True)
        if running:
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)




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

    def state(self) -> BackendState:
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
        return self._server.state()

    def state(self) -> BackendState:
        self.hub.fetch()
        message = (self.hub.raw.get("status") or {}).get("message")
        server = self._server_state()
        return BackendState(getattr(self.hub.status, "value", self.hub.status), message,
                            limits=server.limits if server else None, server=server.server if server else None)

    def last_known_state(self) -> BackendState:
        # The object's own: connect() works offline, and an action already brought the Hub's answer back.
        return BackendState(getattr(self.hub.status, "value", self.hub.status),
                            (self.hub.raw.get("status") or {}).get("message"))

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
