"""Where an endpoint's server runs, behind one interface: :class:`Backend`.

- :class:`~tgi_nb.endpoints.local_backends.ThreadBackend`: a daemon thread of the kernel
  (``create_inference_endpoint``'s default);
- :class:`~tgi_nb.endpoints.local_backends.ProcessBackend`: a child process (``backend="process"``);
- :class:`~tgi_nb.endpoints.remote_backends.RemoteBackend`: a server somewhere else, given by its URL
  (``connect(url)``): TGI, vLLM, llama.cpp...;
- :class:`~tgi_nb.endpoints.remote_backends.HubBackend`: a ``huggingface_hub.InferenceEndpoint``
  (``connect(endpoint)``), managed on Hugging Face.

:class:`~tgi_nb.endpoints.endpoint.InferenceEndpoint` only talks to this interface: what differs between the four
(the ``raw`` payload, which life-cycle actions act and which raise, whether the status is pushed or checked)
lives in the backends. Each backend holds the endpoint's one :class:`~tgi_nb.endpoints.status.StatusMachine`:
the kernel-thread backend hands it to the server's controller, which drives it, so changes are pushed to the
subscribers as they happen; the child-process backend copies its child's changes in as they happen (a long
poll the child answers on a change); the remote ones record what their status checks find in it, checking
every ``watch_every`` seconds in one thread while anyone subscribes. None of them blocks the caller for long: models
load in the background, and every HTTP request has a timeout.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from huggingface_hub.errors import InferenceEndpointError

from .status import DELETED, FAILED, RUNNING, StatusCallback, StatusMachine

logger = logging.getLogger("tgi_nb.endpoints")

#: Seconds a request made through ``endpoint.client`` may take: openai-python's default, and how long a
#: request waits for a scaled-to-zero model to load again.
REQUEST_TIMEOUT = 600.0
#: Seconds one status check of a server elsewhere may take.
PROBE_TIMEOUT = 10.0
#: Seconds between two status checks of a server elsewhere while someone subscribes to its status.
WATCH_EVERY = 5.0


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
    - ``machine`` (the endpoint's status), ``subscribe(callback)``, ``pushes`` (whether changes arrive without
      a check: ``wait()`` then waits on the machine instead of polling);
    - ``state()`` (a check, recorded in ``machine``), ``raw(...)`` (huggingface_hub's payload),
      ``poll_interval(refresh_every)``;
    - ``pause``, ``resume``, ``scale_to_zero``, ``update`` (this base raises :class:`RemoteEndpointError`);
    - ``delete()`` (the user's ``endpoint.delete()``) and ``close()`` (this kernel lets go: at exit, or when a
      name is reused), which differ for a Hugging Face endpoint only: ``close()`` never deletes it there.
    """

    kind = "?"
    local = False
    request_timeout = REQUEST_TIMEOUT
    #: Seconds between two status checks while someone subscribes; None where the status is pushed.
    watch_every: Optional[float] = WATCH_EVERY

    def __init__(self, name: str, token: Optional[str], machine: Optional[StatusMachine] = None):
        self.name = name
        self.token = token
        self.machine = machine if machine is not None else StatusMachine(owner=name)
        self._closed = threading.Event()
        self._watch_lock = threading.Lock()
        self._watcher: Optional[threading.Thread] = None

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

    @property
    def pushes(self) -> bool:
        """True when every change of status reaches ``machine`` as it happens (no check needed)."""
        return self.watch_every is None

    # ------------------------------------------------------------------------------------------------ status
    def subscribe(self, callback: StatusCallback) -> Callable[[], None]:
        """Call ``callback(owner, previous, new)`` on each change of status, from the machine's notifier thread;
        returns the function that stops it. A server this process does not drive is checked every
        ``watch_every`` seconds, in one thread, while anyone subscribes."""
        unsubscribe = self.machine.subscribe(callback)
        self.watch()
        return unsubscribe

    def watch(self) -> None:
        """Start the status checks if someone listens and they are not running (a restarted server's backend
        takes the subscribers of the one before)."""
        if self.pushes:
            return
        with self._watch_lock:
            if self._watcher is None and not self._closed.is_set() and self.machine.has_subscribers:
                self._watcher = threading.Thread(target=self._watch_loop, name=f"tgi_nb-watch-{self.name}",
                                                 daemon=True)
                self._watcher.start()

    def _watch_loop(self) -> None:
        while not self._closed.wait(self.watch_every):
            with self._watch_lock:
                if not self.machine.has_subscribers:  # the last one left: a later subscribe starts another
                    self._watcher = None
                    return
            try:
                self.state()
            except Exception as exc:  # noqa: BLE001 - the Hub offline, a server gone: try again later
                logger.debug("status check of %s failed: %s", self.name, exc)
        with self._watch_lock:
            self._watcher = None

    def state(self) -> BackendState:
        """Check the server now; the status found is recorded in ``machine``."""
        return self._record(self._check())

    def _record(self, state: BackendState) -> BackendState:
        # A pushed machine has one writer, its controller. Writing back a state read a moment earlier could undo
        # a change made in between (read "initializing", the model finishes loading, "initializing" written over
        # "running": the endpoint would show initializing for ever, since no change follows). Only what a check
        # alone can find, a server thread that died, is recorded.
        if self.pushes and state.status != FAILED:
            return state
        if not self._closed.is_set() and self.machine.status != DELETED:
            self.machine.observe(state.status, state.message)
        return state

    def _check(self) -> BackendState:
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
        """Seconds between two status checks in ``wait()`` when the status is not pushed."""
        return refresh_every

    def before_poll(self, status: str, name: str) -> None:
        """What ``wait()`` does about a status that would not change by itself (nothing, here)."""

    def browser_url(self) -> Optional[str]:
        return self.url

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    # ------------------------------------------------------------------------------------------------ actions
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
        is a new one, with the same machine)."""
        self._managed_elsewhere("update")
        return self

    def delete(self) -> None:
        self.close()

    def close(self) -> None:
        """Let go: the status checks stop, and nothing this backend learns changes ``machine`` any more."""
        self._closed.set()
