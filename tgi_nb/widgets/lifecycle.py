"""Background work for widgets: one job at a time in a daemon thread (:class:`Worker`), streamed text
coalesced into a few updates a second (:class:`Coalescer`), pollers for what only polling can read (a server's
``/metrics``), and one widget per cell.

Handlers must return at once (a click waits for any running cell), so everything slow runs in daemon threads.
Those threads end when their widget closes; re-running a cell closes the widget it made before
(JupyterLab and Notebook 7 send the cell's id with each execution), so no thread outlives its output.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any, Callable, Optional

logger = logging.getLogger("tgi_nb.widgets")

#: Browser updates a second while text streams: within 10-20, smooth to the eye, few enough messages for a slow
#: browser or link. Every widget that streams uses this rate.
UPDATES_PER_SECOND = 15

# cell id -> (the execution that made its widgets, those widgets)
_BY_CELL: dict[str, tuple[str, list["weakref.ref[Any]"]]] = {}
_BY_CELL_LOCK = threading.Lock()


def current_execution() -> tuple[Optional[str], Optional[str]]:
    """(cell id, execution message id) of the cell being run; (None, None) outside a kernel, for front-ends
    that do not send the cell id, and in any thread but the main one (a background thread would be given the
    kernel's last request, another cell's maybe: what it makes belongs to the widget that started it)."""
    if threading.current_thread() is not threading.main_thread():
        return None, None
    try:
        from ipykernel.kernelbase import Kernel

        if not Kernel.initialized():
            return None, None
        parent = Kernel.instance().get_parent() or {}
    except Exception:  # noqa: BLE001 - any front-end or kernel quirk means "unknown cell"
        return None, None
    return parent.get("metadata", {}).get("cellId"), parent.get("header", {}).get("msg_id")


def replace_in_cell(widget: Any) -> None:
    """Remember ``widget`` as made by the current cell; when the cell runs again, what its previous run made is
    closed (so its threads stop). Widgets made by one run (a workbench and the chats inside it) live together.

    Example:
        >>> replace_in_cell(object())    # outside a kernel: nothing to replace
    """
    cell, run = current_execution()
    if cell is None or run is None:
        return
    with _BY_CELL_LOCK:
        previous_run, widgets = _BY_CELL.get(cell, (None, []))
        stale = []
        if previous_run != run:
            stale = [ref() for ref in widgets]
            widgets = []
            _BY_CELL[cell] = (run, widgets)
        widgets.append(weakref.ref(widget))
    for old in stale:
        if old is not None:
            old.close()


# Replies to a widget's messages go where its last update said (ipykernel 7.4 routes a comm's incoming
# messages to the subshell named by the parent of its last publish). A thread the kernel did not start
# publishes with the kernel's most recent request as parent, whichever page or subshell sent it: after a page
# reload that is often a subshell the new page has already deleted (the one JupyterLab opens for the
# widget-state comm and closes right after), and the widget it updated stops answering ("Unknown
# subshell_id"). So our threads publish as the request that started them, with no subshell: the main shell,
# which lives as long as the kernel.
def request_parent() -> Optional[dict]:
    """The kernel's current request, without its subshell, as the parent for a background thread's widget
    updates (None outside a kernel). Call it where the work is asked for; pass it to :func:`use_parent`.

    Example:
        >>> request_parent() is None     # outside a kernel
        True
    """
    try:
        from ipykernel.kernelbase import Kernel

        if not Kernel.initialized():
            return None
        parent = Kernel.instance().get_parent() or {}
    except Exception:  # noqa: BLE001 - any kernel quirk: publish as before
        return None
    if not parent.get("header"):
        return None
    return {**parent, "header": {**parent["header"], "subshell_id": None}}


def use_parent(parent: Optional[dict]) -> None:
    """Make ``parent`` (from :func:`request_parent`) the request this thread's widget updates answer. Ignored in
    the threads the kernel runs requests in (the main one, its subshells'): theirs is the request they handle.

    Example:
        >>> use_parent(None)     # nothing to do outside a kernel
    """
    thread = threading.current_thread()
    if parent is None or thread is threading.main_thread() or thread.name.startswith("subshell-"):
        return
    try:
        from ipykernel.kernelbase import Kernel

        var = getattr(Kernel.instance(), "_shell_parent", None)
        if var is not None and hasattr(var, "set"):  # a ContextVar: this thread's own value
            var.set(parent)
    except Exception:  # noqa: BLE001 - any kernel quirk: publish as before
        logger.debug("could not set the thread's parent request", exc_info=True)


def start_thread(target: Callable[..., Any], *args: Any, name: str) -> threading.Thread:
    """Start a daemon thread named ``tgi_nb-<name>`` running ``target(*args)``, whose widget updates answer the
    request that started it (see :func:`use_parent`).

    Example:
        >>> start_thread(print, "from a thread", name="doc").join()
        from a thread
    """
    parent = request_parent()

    def run() -> None:
        use_parent(parent)
        target(*args)

    thread = threading.Thread(target=run, name=f"tgi_nb-{name}", daemon=True)
    thread.start()
    return thread


class Job:
    """One piece of a widget's background work: ``stopping`` is set by ``stop()``, and the functions given to
    ``on_stop`` (close an HTTP stream...) run then, so that the work ends at once rather than at its next
    check."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self._hooks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def on_stop(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Run ``hook()`` when the job is asked to stop (at once if it was); returns what forgets it."""
        with self._lock:
            stopping = self.stopping.is_set()
            if not stopping:
                self._hooks.append(hook)
        if stopping:
            _quietly(hook)

        def forget() -> None:
            with self._lock:
                if hook in self._hooks:
                    self._hooks.remove(hook)

        return forget

    def stop(self) -> None:
        with self._lock:
            self.stopping.set()
            hooks, self._hooks = self._hooks, []
        for hook in hooks:
            _quietly(hook)


def _quietly(hook: Callable[[], None]) -> None:
    try:
        hook()
    except Exception:  # noqa: BLE001 - closing a stream that another thread reads may raise there or here
        logger.debug("stop hook %r failed", hook, exc_info=True)


class Worker:
    """A widget's background work: one job at a time, in a daemon thread named ``tgi_nb-<name>``.

    ``start(work)`` returns at once: the job it started, or None while another runs (or after ``close()``);
    ``submit(work)`` queues it behind the running one instead (actions clicked in a row all happen, in order).
    ``work(job)`` runs in the thread; ``on_end(error)`` runs there after it (``error``: what ``work`` raised, or
    None), before the worker is idle again, so a widget's buttons are right by the time ``wait()`` returns.
    ``stop()`` asks the running job to end, ``close()`` too and drops the queued ones.

    Example:
        >>> worker = Worker("doc")
        >>> ended = []
        >>> job = worker.start(lambda job: job.stopping.wait(30), on_end=ended.append)
        >>> worker.busy, worker.start(lambda job: None)
        (True, None)
        >>> worker.stop(); worker.wait(30), ended
        (True, [None])
        >>> worker.close(); worker.start(lambda job: None) is None
        True
    """

    def __init__(self, name: str):
        self.name = name
        self.idle = threading.Event()
        self.idle.set()
        self._job: Optional[Job] = None
        self._queue: list[tuple[Callable[[Job], Any], Optional[Callable[[Optional[BaseException]], None]]]] = []
        self._closed = False
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        return not self.idle.is_set()

    def start(self, work: Callable[[Job], Any],
              on_end: Optional[Callable[[Optional[BaseException]], None]] = None) -> Optional[Job]:
        with self._lock:
            if self._closed or self._job is not None:
                return None
            job = self._job = Job()
            self.idle.clear()
        start_thread(self._run, job, work, on_end, name=self.name)
        return job

    def submit(self, work: Callable[[Job], Any],
               on_end: Optional[Callable[[Optional[BaseException]], None]] = None) -> bool:
        """Run ``work`` now, or after the jobs before it; False once closed."""
        with self._lock:
            if self._closed:
                return False
            if self._job is not None:
                self._queue.append((work, on_end))
                return True
        return self.start(work, on_end) is not None

    def _run(self, job: Job, work: Callable[[Job], Any],
             on_end: Optional[Callable[[Optional[BaseException]], None]]) -> None:
        while True:
            error: Optional[BaseException] = None
            try:
                work(job)
            except Exception as exc:  # noqa: BLE001 - handed to on_end: the widget shows it, a thread has nobody else
                error = exc
            try:
                if on_end is not None:
                    on_end(error)
                elif error is not None:
                    logger.warning("%s failed: %s: %s", self.name, type(error).__name__, error)
            except Exception:  # noqa: BLE001 - the worker must go on whatever happens
                logger.exception("%s: ending the job failed", self.name)
            with self._lock:
                if not self._queue or self._closed:
                    self._queue.clear()
                    self._job = None
                    self.idle.set()
                    return
                work, on_end = self._queue.pop(0)
                job = self._job = Job()

    def stop(self) -> None:
        """Ask the running job, if any, to end now."""
        job = self._job
        if job is not None:
            job.stop()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until no job runs (scripts and tests); False after ``timeout`` seconds."""
        return self.idle.wait(timeout)

    def close(self) -> None:
        """Stop the running job and start no other (the queued ones are dropped)."""
        with self._lock:
            self._closed = True
        self.stop()


class Coalescer:
    """Streamed text pieces passed on to ``emit`` at most ``updates_per_second`` times a second: a piece that
    comes sooner waits for the next one, or for ``flush()`` at the end. ``text`` is what was passed on,
    ``updates`` how many times.

    Example:
        >>> shown = []
        >>> c = Coalescer(shown.append, updates_per_second=1e-9)   # one update, then none until flush()
        >>> for piece in ("Hel", "lo", "!"): c.add(piece)
        >>> c.flush(); shown, c.text
        (['Hel', 'lo!'], 'Hello!')
    """

    def __init__(self, emit: Callable[[str], None], updates_per_second: float = UPDATES_PER_SECOND):
        if not 0 < updates_per_second <= 60:
            raise ValueError(f"updates_per_second: must be in (0, 60], got {updates_per_second}")
        self.emit = emit
        self.interval = 1.0 / updates_per_second
        self._shown: list[str] = []
        self._pending: list[str] = []
        self._last = float("-inf")

    @property
    def text(self) -> str:
        return "".join(self._shown)

    @property
    def updates(self) -> int:
        return len(self._shown)

    def add(self, piece: str) -> None:
        if not piece:
            return
        self._pending.append(piece)
        if time.monotonic() - self._last >= self.interval:
            self.flush()

    def flush(self) -> None:
        """Pass on what waits, now."""
        if self._pending:
            text = "".join(self._pending)
            self._pending.clear()
            self._last = time.monotonic()
            self._shown.append(text)
            self.emit(text)


class Poller:
    """Calls ``fn()`` every ``interval`` seconds in a daemon thread until ``stop()``.

    A failing call is logged and polling goes on (a server that is restarting answers again later). Only for
    what nothing pushes, such as a server's ``/metrics``: an endpoint's status is subscribed to, never polled.

    Example:
        >>> ticks = []
        >>> p = Poller(0.01, lambda: ticks.append(1), name="doc").start()
        >>> p.wait_ticks(2, timeout=30)
        True
        >>> p.stop(); p.alive
        False
    """

    def __init__(self, interval: float, fn: Callable[[], None], name: str):
        self.interval = interval
        self.fn = fn
        self.ticks = 0
        self._stop = threading.Event()
        self._tick = threading.Condition()
        self.name = name
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "Poller":
        self._thread = start_thread(self._loop, name=self.name)
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.fn()
            except Exception:  # noqa: BLE001 - a poll failing must not end the widget's updates
                logger.debug("poll failed", exc_info=True)
            with self._tick:
                self.ticks += 1
                self._tick.notify_all()
            self._stop.wait(self.interval)

    def wait_ticks(self, count: int, timeout: float) -> bool:
        """Block until ``count`` more polls ran (for tests and scripts); False after ``timeout`` seconds."""
        with self._tick:
            target = self.ticks + count
            return self._tick.wait_for(lambda: self.ticks >= target, timeout)

    def stop(self, join: bool = True) -> None:
        self._stop.set()
        if join and self.alive and threading.current_thread() is not self._thread:
            self._thread.join(10)
