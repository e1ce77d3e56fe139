"""Where an endpoint's server runs: a daemon thread of the kernel, a child process, or somewhere else (a URL).

Every backend answers ``state()`` with ``{"state", "message", "warnings", "limits"}`` (huggingface_hub's status
strings) and has ``url`` (loopback, None until the server listens), ``port``, ``start``, ``pause``, ``resume``,
``scale_to_zero`` and ``stop``. None of them blocks the caller for long: models load in the background.
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
from pathlib import Path
from typing import Any, Optional

from huggingface_hub.errors import InferenceEndpointError

from .spec import LaunchSpec, host_env_for_child

logger = logging.getLogger("tgi_nb.endpoints")


class RemoteEndpointError(InferenceEndpointError):
    """An action that only the owner of a remote endpoint can take (pause, resume, scale to zero)."""


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


def _state(state: str, message: Optional[str] = None, **extra: Any) -> dict[str, Any]:
    return {"state": state, "message": message, "warnings": [], "limits": None, **extra}


class ThreadBackend:
    """The server in a daemon thread of this process (the kernel), with its own event loop.

    ``start()`` returns at once: a starter thread imports the server, builds the app and binds the port; the
    model then loads in the server's loader thread. Works with or without ``nest_asyncio`` since nothing here
    touches the caller's event loop.
    """

    kind = "thread"

    def __init__(self, launch: LaunchSpec, name: str):
        self.launch = launch
        self.name = name
        self.port: Optional[int] = None
        self._app: Any = None
        self._server: Any = None
        self._error: Optional[str] = None
        self._stopped = False
        self._built = threading.Event()
        self._starter: Optional[threading.Thread] = None

    @property
    def url(self) -> Optional[str]:
        return loopback_url(self.launch.host, self.port) if self.port else None

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
            self.port = server.port
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

    def state(self) -> dict[str, Any]:
        if self._error:
            return _state("failed", self._error)
        if self._server is None:
            return _state("pending")
        if not self._server.is_alive:
            return _state("failed", f"the server thread stopped: {self._server.error!r}")
        return self._app.controller.state()

    def _controller(self):
        self._built.wait(120)
        if self._app is None:
            raise InferenceEndpointError(f"Inference Endpoint {self.name} has no running server: "
                                         f"{self._error or 'it is still starting'}")
        return self._app.controller

    def pause(self) -> None:
        self._controller().pause()

    def resume(self) -> None:
        self._controller().resume()

    def scale_to_zero(self) -> None:
        self._controller().scale_to_zero()

    def stop(self) -> None:
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


class ProcessBackend:
    """The server in a child process (``python -m tgi_nb.endpoints.serve``, the launcher's settings plus the
    endpoint's controls), terminated on ``stop()``, at interpreter exit, and by itself when this process dies.

    The child writes its port to a file once it answers HTTP; pause, resume and scale-to-zero go through its
    control route, behind a secret only this process knows. Its output goes to ``log_path``.
    """

    kind = "process"

    def __init__(self, launch: LaunchSpec, name: str):
        self.launch = launch
        self.name = name
        self.port: Optional[int] = None
        self.proc: Optional[subprocess.Popen] = None
        self._control_token = secrets.token_urlsafe(24)
        self._dir = Path(tempfile.mkdtemp(prefix=f"tgi_nb-{name}-"))
        self.log_path = self._dir / "server.log"
        self._port_file = self._dir / "port"
        self._log: Any = None

    @property
    def url(self) -> Optional[str]:
        return loopback_url(self.launch.host, self.port) if self.port else None

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
        self.port = None
        self._log = open(self.log_path, "ab")
        # A session of its own: Ctrl-C in a terminal running this kernel does not reach the child; it exits
        # with its parent through its own watchdog instead.
        self.proc = subprocess.Popen([sys.executable, "-m", "tgi_nb.endpoints.serve"], env=env,
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def _read_port(self) -> Optional[int]:
        if self.port is None and self._port_file.exists():
            try:
                self.port = int(self._port_file.read_text())
            except ValueError:  # written atomically, but be safe
                return None
        return self.port

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the child's output."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _exited(self) -> Optional[dict[str, Any]]:
        code = self.proc.poll() if self.proc is not None else None
        if code is None:
            return None
        return _state("failed", f"the server process exited with code {code}; the end of its log:\n"
                                f"{self.log_tail()}")

    def state(self) -> dict[str, Any]:
        if self.proc is None:
            return _state("pending")
        if self._read_port() is None:
            return self._exited() or _state("pending")
        import httpx

        try:
            response = httpx.get(f"{self.url}/_tgi_nb/endpoint/state",
                                 headers={"x-tgi-nb-control-token": self._control_token}, timeout=10)
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, ValueError) as exc:
            return self._exited() or _state("initializing", f"the server process does not answer: {exc}")

    def _control(self, action: str) -> None:
        import httpx

        deadline = time.monotonic() + 120
        while self._read_port() is None:
            failed = self._exited()
            if failed or time.monotonic() > deadline:
                raise InferenceEndpointError(f"Inference Endpoint {self.name}: the server process is not up: "
                                             f"{(failed or {}).get('message', 'still starting')}")
            time.sleep(0.1)
        response = httpx.post(f"{self.url}/_tgi_nb/endpoint/{action}",
                              headers={"x-tgi-nb-control-token": self._control_token}, timeout=60)
        response.raise_for_status()

    def pause(self) -> None:
        self._control("pause")

    def resume(self) -> None:
        self._control("resume")

    def scale_to_zero(self) -> None:
        self._control("scale_to_zero")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # the child stops its server, which frees the engine
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self._dir, ignore_errors=True)


_REMOTE_STATES = {"loading": "initializing", "idle": "scaledToZero", "paused": "paused", "failed": "failed",
                  "stopped": "paused"}


class RemoteBackend:
    """An endpoint served elsewhere: TGI, vLLM, a Hugging Face Inference Endpoint or another tgi_nb.

    The status comes from its health route (200: running; 503: initializing, or what a tgi_nb server says;
    unreachable: pending) or, for servers without one, from ``/v1/models``. Pause, resume and scale to zero
    raise :class:`RemoteEndpointError`: the endpoint is managed where it runs.
    """

    kind = "remote"

    def __init__(self, url: str, token: Optional[str], health_route: str = "/health", name: str = "remote"):
        self.url = url
        self.token = token
        self.health_route = health_route
        self.name = name
        self.info: Optional[dict[str, Any]] = None
        from urllib.parse import urlsplit

        self.port = urlsplit(url).port

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def start(self, port: Optional[int] = None) -> None:
        pass

    def _get(self, path: str):
        import httpx

        return httpx.get(f"{self.url}{path}", headers=self.headers(), timeout=10, follow_redirects=True)

    def state(self) -> dict[str, Any]:
        import httpx

        try:
            response = self._get(self.health_route)
            if response.status_code in (404, 405):  # Ollama, some proxies: no health route
                response = self._get("/v1/models")
        except httpx.HTTPError as exc:
            return _state("pending", f"cannot reach {self.url}: {exc}")
        code = response.status_code
        if code == 200:
            if self.info is None:
                self.info = self._describe()
            return _state("running", limits=self._limits())
        if code in (401, 403):
            return _state("failed", f"{self.url} refused the token (HTTP {code}): pass token= to connect()")
        if code == 503:
            try:
                body = response.json()
            except ValueError:
                body = {}
            remote = body.get("status") if isinstance(body, dict) else None
            state = _REMOTE_STATES.get(remote, "initializing")
            return _state(state, body.get("error") if isinstance(body, dict) and state == "failed" else None)
        return _state("failed", f"{self.url}{self.health_route} answered HTTP {code}: {response.text[:200]}")

    def _describe(self) -> dict[str, Any]:
        """What the server says it serves: TGI's /info, else the first model of /v1/models."""
        import httpx

        try:
            response = self._get("/info")
            body = response.json() if response.status_code == 200 else None
            if isinstance(body, dict) and body.get("model_id"):
                return body
            response = self._get("/v1/models")
            if response.status_code == 200:
                models = response.json().get("data") or []
                if models:
                    return {"model_id": models[0].get("id"),
                            "max_total_tokens": models[0].get("max_model_len")}
        except (httpx.HTTPError, ValueError):
            pass
        return {}

    def _limits(self) -> Optional[dict[str, Any]]:
        info = self.info or {}
        keys = ("max_input_tokens", "max_total_tokens", "max_batch_total_tokens")
        limits = {k: info.get(k) for k in keys if info.get(k) is not None}
        return limits or None

    def _managed_elsewhere(self, action: str) -> None:
        raise RemoteEndpointError(
            f"Cannot {action} {self.url}: it is a remote endpoint, managed where it runs (the Hugging Face UI or "
            f"huggingface_hub for an Inference Endpoint, its own host for TGI or vLLM).")

    def pause(self) -> None:
        self._managed_elsewhere("pause")

    def resume(self) -> None:
        self._managed_elsewhere("resume")

    def scale_to_zero(self) -> None:
        self._managed_elsewhere("scale to zero")

    def stop(self) -> None:
        pass
