"""The bounded in-memory store behind ``store=true``, ``previous_response_id`` and the
GET / DELETE / cancel / input_items routes of /v1/responses.

Bounds: at most :data:`MAX_RESPONSES` responses (the least recently stored goes first) and each for at most
:data:`MAX_AGE_S` seconds after it was created; a response past either bound is gone (404), as a deleted one
is. Nothing is written to disk: a server restart forgets every response. The store lives on the event loop's
thread (routes are async), so it needs no lock.

Example:
    >>> store = ResponseStore(max_responses=1)
    >>> store.put(StoredResponse(ResponseObject(id="resp_1", created_at=0, model="tgi"), [], []))
    >>> store.put(StoredResponse(ResponseObject(id="resp_2", created_at=0, model="tgi"), [], []))
    >>> store.find("resp_1") is None, store.get("resp_2").response.id
    (True, 'resp_2')
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from .errors import NotFound
from .responses_protocol import ResponseObject

MAX_RESPONSES = 1000
MAX_AGE_S = 3600.0


@dataclass(slots=True)
class StoredResponse:
    """A response, its input items (as /input_items lists them) and the conversation a next turn continues
    (chat messages without the instructions, this response's output included once it finished).
    ``cancel`` stops it while it runs (None once it finished)."""

    response: ResponseObject
    input_items: list[dict[str, Any]]
    conversation: list[dict[str, Any]]
    cancel: Optional[Callable[[], None]] = None
    stored_at: float = field(default_factory=time.monotonic)


class ResponseStore:
    """Responses by id, bounded in number and age (see the module's docstring)."""

    def __init__(self, max_responses: int = MAX_RESPONSES, max_age_s: float = MAX_AGE_S,
                 clock: Callable[[], float] = time.monotonic):
        self.max_responses = max_responses
        self.max_age_s = max_age_s
        self._clock = clock
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def __iter__(self) -> Iterator[StoredResponse]:
        """The stored responses, oldest first."""
        self._expire()
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        self._expire()
        return len(self._entries)

    def _expire(self) -> None:
        cutoff = self._clock() - self.max_age_s
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if oldest.stored_at >= cutoff:
                break
            self._entries.popitem(last=False)

    def put(self, entry: StoredResponse) -> None:
        """Keep ``entry`` (replacing one with its id), dropping the oldest beyond the bounds."""
        entry.stored_at = self._clock()
        self._entries.pop(entry.response.id, None)
        self._entries[entry.response.id] = entry
        self._expire()
        while len(self._entries) > self.max_responses:
            self._entries.popitem(last=False)

    def find(self, response_id: str) -> Optional[StoredResponse]:
        """The stored response, or None."""
        self._expire()
        return self._entries.get(response_id)

    def get(self, response_id: str, param: Optional[str] = None) -> StoredResponse:
        """The stored response, or a 404 naming ``param`` (the field that carried the id, if any)."""
        entry = self.find(response_id)
        if entry is None:
            raise NotFound(f"Response with id '{response_id}' not found (unknown, deleted, not stored "
                           f"(store=false), or older than this server keeps)", param=param,
                           code="response_not_found")
        return entry

    def delete(self, response_id: str) -> StoredResponse:
        """Remove a response (stopping it if it runs); 404 if unknown."""
        entry = self.get(response_id)
        if entry.cancel is not None:
            entry.cancel()
        del self._entries[response_id]
        return entry

