"""Background work for widgets: pollers that stop when their widget closes, and one widget per cell.

Handlers must return at once (a click waits for any running cell), so everything slow runs in daemon threads.
Those threads end when their widget closes; re-running a cell closes the widget it made before
(JupyterLab and Notebook 7 send the cell's id with each execution), so no poller outlives its output.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any, Callable, Optional

logger = logging.getLogger("tgi_nb.widgets")

# cell id -> (the execution that made its widgets, those widgets)
_BY_CELL: dict[str, tuple[str, list["weakref.ref[Any]"]]] = {}
_BY_CELL_LOCK = threading.Lock()


def current_execution() -> tuple[Optional[str], Optional[str]]:
    """(cell id, execution message id) of the cell being run; (None, None) outside a kernel or for front-ends
    that do not send the cell id."""
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


class Poller:
    """Calls ``fn()`` every ``interval`` seconds in a daemon thread until ``stop()``.

    A failing call is logged and polling goes on (a server that is restarting answers again later).
    Switching to the endpoint's transition callbacks later only means not starting this thread.

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
        self._thread = threading.Thread(target=self._loop, name=f"tgi_nb-{name}", daemon=True)

    def start(self) -> "Poller":
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

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
        if join and self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(10)
