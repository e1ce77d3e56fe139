"""Request priorities: interactive requests before the Batch API's lines.

A route does not take the priority as a parameter: the batch runner sets :data:`request_priority` in the task
that sends a line through the app, and :class:`~tgi_nb.server.streaming.GenerationStream` reads it where it
submits to the engine. An HTTP client cannot set it.

Example:
    >>> request_priority.get() == INTERACTIVE_PRIORITY
    True
"""

from __future__ import annotations

from contextvars import ContextVar

INTERACTIVE_PRIORITY = 0
BATCH_PRIORITY = 1  # larger is later

request_priority: ContextVar[int] = ContextVar("tgi_nb_request_priority", default=INTERACTIVE_PRIORITY)
