"""The backends of a server this kernel runs: in a daemon thread (:class:`ThreadBackend`) or a child process
(:class:`ProcessBackend`), for a ``create_inference_endpoint`` request.
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
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from huggingface_hub.errors import InferenceEndpointError

from .backends import PROBE_TIMEOUT, Backend, BackendState, loopback_url
from .browser import browser_url
from .spec import EndpointRequest, build_request, host_env_for_child
from .status import DELETED, FAILED, INITIALIZING, PAUSED, PENDING, RUNNING, SCALED_TO_ZERO, StatusMachine

logger = logging.getLogger("tgi_nb.endpoints")


class LocalBackend(Backend):
    """A server this kernel runs for a ``create_inference_endpoint`` request (a thread or a child process).

    ``url`` stays None until the model first runs, as on Hugging Face; re-created with other arguments
    (:meth:`adopt`), it restarts on the same port, and the new backend takes over the status machine (so
    subscribers see running -> initializing -> running).
    """

    local = True

    def __init__(self, request: EndpointRequest, kwargs: dict[str, Any], machine: Optional[StatusMachine] = None):
        super().__init__(request.name, request.token, machine)
        self.request = request
        self.kwargs = kwargs
        self.launch = request.launch
        self._port: Optional[int] = None
        self._ever_running = False

    @staticmethod
    def for_request(request: EndpointRequest, kwargs: dict[str, Any], port: Optional[int],
                    machine: Optional[StatusMachine] = None) -> "LocalBackend":
        """A started backend of the kind ``request`` asks for, on ``port`` (None: a free one), driving
        ``machine`` (None: a new one)."""
        backend_cls = ProcessBackend if request.launch.backend == "process" else ThreadBackend
        backend = backend_cls(request, kwargs, machine)
        backend.start(port)
        backend.watch()  # the subscribers of the server it replaces, if any
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

    def state(self) -> BackendState:
        state = super().state()
        if state.status == RUNNING:
            self._ever_running = True
        state.server = "tgi_nb"
        return state

    def raw(self, *, status: str, message: Optional[str], created_at: datetime, updated_at: datetime
            ) -> dict[str, Any]:
        return self.request.raw(state=status, url=self.url, message=message, created_at=created_at,
                                updated_at=updated_at)

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
        machine = self.machine
        self.close()
        if machine.status != PENDING:
            machine.move(INITIALIZING)  # a restart
        return LocalBackend.for_request(request, kwargs, port, machine)


# update() arguments that huggingface_hub sends but a local server does not use: recorded in raw only.
_RECORDED_ONLY = ("tensor_parallel_size", "data_parallel_size")


def _wire_state(body: dict[str, Any]) -> BackendState:
    return BackendState(status=body["status"], message=body.get("message"), warnings=list(body.get("warnings") or []),
                        limits=body.get("limits"))


class ThreadBackend(LocalBackend):
    """The server in a daemon thread of this process (the kernel), with its own event loop.

    ``start()`` returns at once: a starter thread imports the server, builds the app and binds the port; the
    model then loads in the server's loader thread. Works with or without ``nest_asyncio`` since nothing here
    touches the caller's event loop. The server's controller drives this backend's machine: every change
    reaches the subscribers as it is made, and nothing polls.
    """

    kind = "thread"
    watch_every = None

    def __init__(self, request: EndpointRequest, kwargs: dict[str, Any], machine: Optional[StatusMachine] = None):
        super().__init__(request, kwargs, machine)
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
                                     args=launch.args, api_key=launch.api_key,
                                     accepted_key_digests=launch.accepted_key_digests, accelerator=launch.accelerator,
                                     scale_to_zero_after=launch.scale_to_zero_after, machine=self.machine)
            server = _bind_server(ServerThread, app, launch.host, port, fixed=launch.port is not None,
                                  notes=app.controller.notes)
            self._port = server.port
            server.start()
            if self._stopped:  # deleted or replaced while starting: stop() is waiting for this thread
                app.controller.close()  # the machine may be a restarted server's by now
                server.stop()
                return
            self._app, self._server = app, server
        except BaseException as exc:  # noqa: BLE001 - reported as the endpoint's failed status by wait()
            self._error = f"{type(exc).__name__}: {exc}"
            if not self._closed.is_set():
                self.machine.observe(FAILED, self._error)
            logger.warning("endpoint %s failed to start: %s", self.name, self._error, exc_info=logger.isEnabledFor(10))
        finally:
            self._built.set()

    def _check(self) -> BackendState:
        if self._server is None:  # starting (pending, or initializing for a restart), or failed to start
            return BackendState(self.machine.status, self.machine.message)
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
        super().close()
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
    control route, behind a secret only this process knows. Its output goes to ``log_path``. The child drives
    its own status machine; a relay thread copies each change into this backend's machine as it happens: it
    keeps one long poll open (``GET state?while=<status>``, answered by the child when its status becomes
    another), so nothing polls. Until the child answers HTTP the relay looks for its port file (every 0.1 s)
    and whether it exited.
    """

    kind = "process"
    watch_every = None  # pushed, through the relay's long poll
    relay_wait = 30.0  # seconds the child holds a long poll before answering "no change" (then it is asked again)

    def __init__(self, request: EndpointRequest, kwargs: dict[str, Any], machine: Optional[StatusMachine] = None):
        super().__init__(request, kwargs, machine)
        name = request.name
        self.proc: Optional[subprocess.Popen] = None
        self._control_token = secrets.token_urlsafe(24)
        self._dir = Path(tempfile.mkdtemp(prefix=f"tgi_nb-{name}-"))
        self.log_path = self._dir / "server.log"
        self._port_file = self._dir / "port"
        self._log: Any = None
        self._relay: Optional[threading.Thread] = None
        self._applied_lock = threading.Lock()
        self._applied_at = float("-inf")  # the child's changed_at of the state last applied to the machine

    def start(self, port: Optional[int] = None) -> None:
        launch = self.launch
        spec = {"model_id": launch.model_id, "revision": launch.revision, "env": launch.env_dict,
                "args": list(launch.args), "api_key": launch.api_key,
                "accepted_key_digests": list(launch.accepted_key_digests), "accelerator": launch.accelerator,
                "scale_to_zero_after": launch.scale_to_zero_after, "host": launch.host, "port": port or 0,
                "port_fallback": launch.port is None, "control_token": self._control_token,
                "port_file": str(self._port_file), "parent_pid": os.getpid(),
                # /v1/files under this backend's folder: removed with it even if the child is killed
                "files_dir": str(self._dir / "files")}
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
        self._relay = threading.Thread(target=self._relay_loop, name=f"tgi_nb-relay-{self.name}", daemon=True)
        self._relay.start()

    def _relay_loop(self) -> None:
        """Copy the child's status changes into ``machine`` until this backend closes or the child exits."""
        import httpx

        from .runtime import CONTROL_HEADER

        timeout = httpx.Timeout(PROBE_TIMEOUT, read=self.relay_wait + 30)  # the child answers within relay_wait
        with httpx.Client(headers={CONTROL_HEADER: self._control_token}, timeout=timeout) as client:
            while not self._closed.is_set():
                if self._read_port() is None:  # not answering HTTP yet
                    failed = self._exited()
                    if failed is not None:
                        self._record(failed)
                        return
                    self._closed.wait(0.1)
                    continue
                try:
                    response = client.get(f"{self.server_url}/_tgi_nb/endpoint/state",
                                          params={"while": self.machine.status, "timeout": self.relay_wait})
                    response.raise_for_status()
                    self._apply(response.json())
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    failed = self._exited()
                    if failed is not None:
                        self._record(failed)
                        return
                    logger.debug("status relay of %s: %s; asking again", self.name, exc)
                    self._closed.wait(0.5)  # the child is alive but did not answer: ask again shortly

    def _apply(self, body: dict[str, Any]) -> None:
        """Record the child's state ``body`` unless one that changed later was recorded already (an action's
        answer and the relay's can arrive in either order)."""
        with self._applied_lock:
            changed_at = float(body.get("changed_at", 0.0))
            if changed_at < self._applied_at or self._closed.is_set() or self.machine.status == DELETED:
                return
            self._applied_at = changed_at
            if body["status"] == RUNNING:
                self._ever_running = True
            self.machine.observe(body["status"], body.get("message"))

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

    def _check(self) -> BackendState:
        if self.proc is None:
            return BackendState(PENDING)
        if self._read_port() is None:
            return self._exited() or BackendState(PENDING)
        import httpx

        try:
            response = httpx.get(f"{self.server_url}/_tgi_nb/endpoint/state",
                                 headers={"x-tgi-nb-control-token": self._control_token}, timeout=PROBE_TIMEOUT)
            response.raise_for_status()
            body = response.json()
            self._apply(body)  # fresher than the relay's last word, maybe: ordered by the child's changed_at
            return _wire_state(body)
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
        self._apply(response.json())  # the status the action left, at once (the relay may tell it a moment later)

    def close(self) -> None:
        super().close()
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
