"""One status vocabulary and one state machine for every endpoint, local or remote.

Statuses are huggingface_hub's :class:`~huggingface_hub.InferenceEndpointStatus` values (a ``str`` enum, so they
compare equal to ``"running"`` and friends), plus ``"deleted"`` once ``delete()`` forgot the endpoint. The life
cycle a local endpoint goes through::

    pending ──> initializing ──> running ⇄ paused
                     ^   │          │  ⇄ scaledToZero
                     │   v          v
                     └─ failed <────┘        (any status) ──> deleted

:class:`StatusMachine` holds one endpoint's status. ``move()`` takes the transitions of :data:`TRANSITIONS`
only, and is what a controller that *drives* the life cycle calls (an unlisted move is a bug there);
``observe()`` records what a server elsewhere reports, which may skip steps between two polls (paused seen
as running, a restart seen as pending). Both notify subscribers, in order, from one background thread per
machine, so that a slow callback (a widget redrawing) never blocks the engine, a request or a poll.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable, Optional, Union

from huggingface_hub import InferenceEndpointStatus

logger = logging.getLogger("tgi_nb.endpoints")

Status = InferenceEndpointStatus
DELETED = "deleted"  # not one of huggingface_hub's: there a deleted endpoint is simply gone

# Plain strings: the enum's members hash by name, so "running" would not find Status.RUNNING in a dict.
PENDING, INITIALIZING, RUNNING = Status.PENDING.value, Status.INITIALIZING.value, Status.RUNNING.value
PAUSED, SCALED_TO_ZERO, FAILED = Status.PAUSED.value, Status.SCALED_TO_ZERO.value, Status.FAILED.value
UPDATING, UPDATE_FAILED = Status.UPDATING.value, Status.UPDATE_FAILED.value

#: The moves a driven life cycle may make. A restart (``update()`` changing what is served, ``resume()`` after
#: a failure) goes back to initializing; freeing the model while it still loads is allowed (it is freed once
#: loaded); Hugging Face's own updating / updateFailed appear on endpoints managed there.
TRANSITIONS: dict[str, tuple[str, ...]] = {
    PENDING: (INITIALIZING, FAILED, PAUSED),
    INITIALIZING: (RUNNING, FAILED, PAUSED, SCALED_TO_ZERO),
    RUNNING: (PAUSED, SCALED_TO_ZERO, INITIALIZING, UPDATING, FAILED),
    PAUSED: (INITIALIZING, SCALED_TO_ZERO),
    SCALED_TO_ZERO: (INITIALIZING, PAUSED),
    FAILED: (INITIALIZING, PAUSED),
    UPDATING: (RUNNING, UPDATE_FAILED, FAILED),
    UPDATE_FAILED: (UPDATING, INITIALIZING),
    DELETED: (),
}

#: The life-cycle actions a user takes, and the status each one moves to.
ACTIONS: dict[str, str] = {"pause": PAUSED, "resume": INITIALIZING, "scale_to_zero": SCALED_TO_ZERO}
# Statuses in which the model is served or on its way: the move to initializing from there is a restart
# (update()), not something resume() does.
_LIVE = (PENDING, INITIALIZING, RUNNING, UPDATING)

StatusCallback = Callable[[Any, str, str], None]
_LAST_UNSUBSCRIBED = object()  # queued when the last subscriber leaves: the notifier thread may end


def as_status(value: Union[str, Status]) -> str:
    """``value`` as a status string, checked against huggingface_hub's values (and ``"deleted"``).

    Example:
        >>> as_status("scaledToZero"), as_status(Status.RUNNING)
        ('scaledToZero', 'running')
    """
    text = getattr(value, "value", value)
    if text not in TRANSITIONS:
        raise ValueError(f"status: must be one of {', '.join(TRANSITIONS)}, got {value!r}")
    return text


def allowed_actions(status: Union[str, Status]) -> tuple[str, ...]:
    """The actions that do something in ``status``, from :data:`TRANSITIONS`: those whose target status is a
    listed move (resume only where the model is neither served nor loading), and delete until deleted. The
    controller of a local endpoint ignores the others; the widgets' buttons offer only these.

    Example:
        >>> allowed_actions("running"), allowed_actions("paused"), allowed_actions("failed")
        (('pause', 'scale_to_zero', 'delete'), ('resume', 'scale_to_zero', 'delete'), ('pause', 'resume', 'delete'))
        >>> allowed_actions("deleted")
        ()
    """
    status = as_status(status)
    if status == DELETED:
        return ()
    return (*(action for action, target in ACTIONS.items()
              if target in TRANSITIONS[status] and not (action == "resume" and status in _LIVE)), "delete")


class InvalidTransition(RuntimeError):
    """A driven life cycle tried a move that :data:`TRANSITIONS` does not list."""


class StatusMachine:
    """The status of one endpoint, its message (why it failed, why it is pending), and its subscribers.

    Thread-safe. Callbacks receive ``(owner, previous_status, new_status)`` on the machine's notifier thread;
    an exception in one is logged and the others still run.

    Example:
        >>> machine = StatusMachine(owner="demo")
        >>> seen = []
        >>> unsubscribe = machine.subscribe(lambda owner, old, new: seen.append((old, new)))
        >>> machine.move("initializing"); machine.move("running")
        True
        True
        >>> machine.flush() and seen
        [('pending', 'initializing'), ('initializing', 'running')]
        >>> machine.move("pending")
        Traceback (most recent call last):
        ...
        tgi_nb.endpoints.status.InvalidTransition: running -> pending is not a transition of an endpoint; from running: paused, scaledToZero, initializing, updating, failed
        >>> unsubscribe()
    """

    def __init__(self, owner: Any = None, status: str = PENDING, message: Optional[str] = None):
        self.owner = owner
        self._status = as_status(status)
        self._message = message
        self._changed_at = time.monotonic()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # wait_change() waits on it
        self._subscribers: list[StatusCallback] = []
        # (previous, new) changes, or an Event that flush() waits on
        self._events: "queue.Queue[Union[tuple[str, str], threading.Event]]" = queue.Queue()
        self._notifier: Optional[threading.Thread] = None

    @property
    def status(self) -> str:
        return self._status

    @property
    def message(self) -> Optional[str]:
        return self._message

    @property
    def changed_at(self) -> float:
        """``time.monotonic()`` of the last change of status."""
        return self._changed_at

    def move(self, status: Union[str, Status], message: Optional[str] = None) -> bool:
        """Take a listed transition (staying put is always allowed: only the message changes); True when the
        status changed. Raises :class:`InvalidTransition` for any other move."""
        return self._set(as_status(status), message, checked=True)

    def observe(self, status: Union[str, Status], message: Optional[str] = None) -> bool:
        """Record what a server elsewhere reports, even a move that skipped steps between two polls."""
        return self._set(as_status(status), message, checked=False)

    def _set(self, status: str, message: Optional[str], *, checked: bool) -> bool:
        with self._lock:
            previous = self._status
            if previous == status:
                self._message = message
                return False
            if checked and status not in TRANSITIONS[previous]:
                allowed = ", ".join(TRANSITIONS[previous]) or "none (it is final)"
                raise InvalidTransition(f"{previous} -> {status} is not a transition of an endpoint; "
                                        f"from {previous}: {allowed}")
            self._status, self._message, self._changed_at = status, message, time.monotonic()
            self._changed.notify_all()
            if self._subscribers:
                self._events.put((previous, status))
            if status == DELETED and self._notifier is not None:
                # Final: nothing follows, so the subscribers are let go once they have heard it.
                self._subscribers.clear()
                self._events.put(_LAST_UNSUBSCRIBED)
        logger.debug("endpoint %s: %s -> %s", self.owner, previous, status)
        return True

    def subscribe(self, callback: StatusCallback) -> Callable[[], None]:
        """Call ``callback(owner, previous, new)`` on every later change; returns the function that stops it."""
        if not callable(callback):
            raise TypeError(f"callback: expected a callable (endpoint, previous, new), got {type(callback).__name__}")
        with self._lock:
            self._subscribers.append(callback)
            if self._notifier is None:
                self._notifier = threading.Thread(target=self._notify_loop, name="tgi_nb-endpoint-status",
                                                  daemon=True)
                self._notifier.start()

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)
                if not self._subscribers and self._notifier is not None:
                    self._events.put(_LAST_UNSUBSCRIBED)  # the notifier ends once it has delivered what came before

        return unsubscribe

    @property
    def has_subscribers(self) -> bool:
        return bool(self._subscribers)

    def wait_change(self, status: Union[str, Status], timeout: Optional[float] = None) -> str:
        """Block until the status is not ``status`` (at once when it is not), or ``timeout`` seconds passed;
        returns the status then. What ``wait()`` does on an endpoint whose status is pushed: no polling.

        Example:
            >>> StatusMachine(status="running").wait_change("pending")
            'running'
        """
        status = as_status(status)
        with self._changed:
            self._changed.wait_for(lambda: self._status != status, timeout)
            return self._status

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every change made so far was delivered (tests, and ``delete()``); True when it was."""
        done = threading.Event()
        with self._lock:  # the notifier ends under this lock: an event put here is always set
            if self._notifier is None:
                return True
            self._events.put(done)
        return done.wait(timeout)

    def _notify_loop(self) -> None:
        while True:
            event = self._events.get()
            if isinstance(event, threading.Event):
                event.set()
                continue
            if event is _LAST_UNSUBSCRIBED:
                with self._lock:
                    # A subscribe() since then keeps this thread; else it ends and the next one starts another.
                    if not self._subscribers:
                        self._notifier = None
                        while not self._events.empty():  # flush() waiters queued behind the sentinel
                            pending = self._events.get_nowait()
                            if isinstance(pending, threading.Event):
                                pending.set()
                        return
                continue
            previous, new = event
            with self._lock:
                callbacks = list(self._subscribers)
            for callback in callbacks:
                try:
                    callback(self.owner, previous, new)
                except Exception:  # noqa: BLE001 - a subscriber's bug must not stop the others
                    logger.exception("status callback %r failed on %s -> %s", callback, previous, new)
