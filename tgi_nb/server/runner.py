"""Running an app with uvicorn in a background thread (a notebook kernel, tests) or in the foreground."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Optional

import uvicorn

logger = logging.getLogger("tgi_nb.server")


def bind_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening TCP socket; port 0 picks a free one. Raises ``OSError`` when the port is taken.

    Binding before uvicorn starts removes the race between "find a free port" and "listen on it", and
    turns "address already in use" into an exception in the caller's thread.

    Example:
        >>> sock = bind_socket(port=0)
        >>> sock.getsockname()[1] > 0
        True
        >>> sock.close()
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT after a restart is free
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def run_in_new_loop(coro) -> None:
    """Run ``coro`` to completion in a fresh event loop of the calling thread, then clean up as
    ``asyncio.run`` does (pending tasks cancelled, async generators and the default executor shut down,
    so no worker thread is left to block interpreter exit). Unlike ``asyncio.run`` it installs no SIGINT
    handler and never touches another thread's loop (a Jupyter kernel's, patched by nest_asyncio or not).
    """
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(coro)
    finally:
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


class DrainingServer(uvicorn.Server):
    """uvicorn's server that, when shutdown begins, first calls the app's ``state.drain()`` if it has one.

    uvicorn's graceful shutdown waits for open responses to finish; a generation stream can run for
    minutes, so without this a stop would wait out ``timeout_graceful_shutdown`` and then cancel the
    response mid-chunk. ``drain()`` (:meth:`tgi_nb.server.context.ServerContext.drain`) ends every open
    generation with a 503 ``shutting_down`` error and aborts its engine requests, so connections close
    at once and their KV blocks are freed.

    Example:
        >>> from tgi_nb.server import build_app
        >>> server = DrainingServer(uvicorn.Config(build_app(lambda: None)))
    """

    async def shutdown(self, sockets: Optional[list[socket.socket]] = None) -> None:
        drain = getattr(getattr(self.config.app, "state", None), "drain", None)
        if drain is not None:
            try:
                drain()
            except Exception:  # noqa: BLE001 - a failed drain must not stop the shutdown itself
                logger.exception("draining open requests failed")
        await super().shutdown(sockets)


class ServerThread:
    """A uvicorn server in a daemon thread with its own event loop.

    Works inside a Jupyter kernel (with or without ``nest_asyncio``): the thread creates a fresh loop and
    never touches the kernel's. ``stop()`` asks uvicorn to exit: open generation requests end at once
    with a 503 ``shutting_down`` error and their engine requests are aborted (:class:`DrainingServer`),
    other responses get ``graceful_shutdown_timeout`` seconds; then the app's shutdown runs (which frees
    an engine the app built). ``stop()`` may be called from any number of threads, any number of times.

    Example:
        >>> from tgi_nb.server import ServerSettings, ServerThread, build_app
        >>> server = ServerThread(build_app(lambda: None), port=0).start()
        >>> server.url.startswith("http://127.0.0.1:")
        True
        >>> server.stop()
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning",
                 graceful_shutdown_timeout: float = 5.0, access_log: bool = False):
        self.app = app
        self.host = host
        self.sock = bind_socket(host, port)
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, log_config=None, access_log=access_log, lifespan="on",
                                loop="asyncio", ws="none", timeout_graceful_shutdown=graceful_shutdown_timeout)
        self.server = DrainingServer(config)
        self._thread: Optional[threading.Thread] = None
        # Serialises start() and stop(): the thread handle is set once and never cleared, so a stop()
        # racing another (a test's stopper thread and a context manager's exit) always sees it.
        self._lock = threading.Lock()
        self.error: Optional[BaseException] = None

    @property
    def url(self) -> str:
        """``http://host:port`` without a trailing slash."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _run(self) -> None:
        try:
            run_in_new_loop(self.server.serve(sockets=[self.sock]))
        except BaseException as exc:  # noqa: BLE001 - reported through .error and start()
            self.error = exc
            logger.exception("server thread failed")
        finally:
            self.sock.close()

    def start(self, timeout: float = 30.0) -> "ServerThread":
        """Start serving and return once uvicorn accepts connections (the model may still be loading).
        A server runs once: its socket is closed when it stops, so a stopped one cannot start again."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError(f"the server on {self.url} was already started; build a new ServerThread")
            thread = self._thread = threading.Thread(target=self._run, name=f"tgi_nb-server-{self.port}",
                                                     daemon=True)
            thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not thread.is_alive():
                raise RuntimeError(f"the server on {self.url} stopped during start-up: {self.error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server on {self.url} did not start within {timeout}s")
            time.sleep(0.01)
        return self

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop serving and free the port; returns once the server thread ended. Idempotent, and safe
        from several threads at once (each returns once the server stopped)."""
        with self._lock:
            thread = self._thread
            if thread is None:
                self.sock.close()
                return
            if thread is threading.current_thread():
                raise RuntimeError("stop() called from the server's own thread would wait for itself")
            self.server.should_exit = True
            thread.join(timeout)
            if thread.is_alive():
                logger.warning("the server on %s did not stop within %ss: closing its connections", self.url,
                               timeout)
                self.server.force_exit = True
                thread.join(5)

    def __enter__(self) -> "ServerThread":
        return self.start() if self._thread is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
