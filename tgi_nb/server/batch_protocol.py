"""Request and response models of OpenAI's Files and Batch APIs (``/v1/files``, ``/v1/batches``).

Shapes follow openai-python's ``FileObject``, ``FileDeleted``, ``Batch`` and its cursor pages (``data``,
``first_id``, ``last_id``, ``has_more``), so ``client.files.*`` and ``client.batches.*`` parse them as they
parse OpenAI's. One line of a batch's output or error file is a :class:`BatchOutputLine`.

Example:
    >>> BatchCreateRequest(input_file_id="file-1", endpoint="/v1/chat/completions").completion_window
    '24h'
    >>> BatchOutputLine(id="batch_req_1", custom_id="a", error=BatchLineError(code="c", message="m")).response is None
    True
"""

from __future__ import annotations

from typing import Any, Generic, Literal, Optional, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from .protocol import _Request
from .responses_protocol import ResponseUsage

T = TypeVar("T")
# What OpenAI's Batch API accepts as completion_window (its only value).
COMPLETION_WINDOWS = {"24h": 24 * 3600}


class FileObject(BaseModel):
    """An uploaded file (``purpose="batch"``) or a batch's output or error file (``purpose="batch_output"``)."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: Optional[int] = None
    status_details: Optional[str] = None


class CursorPage(BaseModel, Generic[T]):
    """A page of a list, as openai-python's ``SyncCursorPage`` follows it (``after=last_id`` while ``has_more``)."""

    object: Literal["list"] = "list"
    data: list[T]
    first_id: Optional[str] = None
    last_id: Optional[str] = None
    has_more: bool = False

    @classmethod
    def of(cls, data: list[Any], has_more: bool) -> "CursorPage":
        return cls(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                   has_more=has_more)


FileList = CursorPage[FileObject]


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class ExpiresAfter(_Request):
    anchor: Literal["created_at"] = "created_at"
    seconds: int = Field(ge=3600, le=2592000)


class BatchCreateRequest(_Request):
    """POST /v1/batches. ``completion_window`` is accepted as OpenAI accepts it (``24h``): a batch still
    running when it ends expires, its unfinished lines in the error file."""

    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: Optional[dict[str, str]] = None
    output_expires_after: Optional[ExpiresAfter] = None


class BatchRequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchError(BaseModel):
    code: Optional[str] = None
    message: Optional[str] = None
    param: Optional[str] = None
    line: Optional[int] = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError] = Field(default_factory=list)


class BatchUsage(ResponseUsage):
    """Tokens over every line that ran, as OpenAI reports them for a batch (the Responses API's usage shape)."""

    def add(self, usage: Any) -> None:
        """Count one response's ``usage`` (chat and completions' ``prompt_tokens`` / ``completion_tokens``,
        embeddings' ``prompt_tokens``, the Responses API's ``input_tokens`` / ``output_tokens``).

        Example:
            >>> u = BatchUsage(); u.add({"prompt_tokens": 3, "completion_tokens": 2}); u.add({"input_tokens": 1})
            >>> u.input_tokens, u.output_tokens, u.total_tokens
            (4, 2, 6)
        """
        if not isinstance(usage, dict):
            return
        inputs = usage.get("prompt_tokens", usage.get("input_tokens")) or 0
        outputs = usage.get("completion_tokens", usage.get("output_tokens")) or 0
        details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
        self.input_tokens += inputs
        self.output_tokens += outputs
        self.total_tokens += inputs + outputs
        self.input_tokens_details.cached_tokens += (details.get("cached_tokens") or 0) if isinstance(details,
                                                                                                    dict) else 0


class Batch(BaseModel):
    """A batch, as ``client.batches.retrieve`` returns it; ``request_counts`` move while it runs."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: Optional[str] = None
    errors: Optional[BatchErrors] = None
    input_file_id: str
    completion_window: str
    status: Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                    "cancelled"] = "validating"
    output_file_id: Optional[str] = None
    error_file_id: Optional[str] = None
    created_at: int
    in_progress_at: Optional[int] = None
    expires_at: Optional[int] = None
    finalizing_at: Optional[int] = None
    completed_at: Optional[int] = None
    failed_at: Optional[int] = None
    expired_at: Optional[int] = None
    cancelling_at: Optional[int] = None
    cancelled_at: Optional[int] = None
    request_counts: BatchRequestCounts = Field(default_factory=BatchRequestCounts)
    usage: BatchUsage = Field(default_factory=BatchUsage)
    metadata: Optional[dict[str, str]] = None

    @property
    def done(self) -> bool:
        """Whether the batch reached a final status."""
        return self.status in ("failed", "completed", "expired", "cancelled")


BatchList = CursorPage[Batch]


class BatchInputLine(BaseModel):
    """One line of a batch's input file: the request ``body`` to POST to ``url``."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str = Field(min_length=1)
    method: Literal["POST"]
    url: str
    body: dict[str, Any]


class BatchLineResponse(BaseModel):
    status_code: int
    request_id: str
    body: Any


class BatchLineError(BaseModel):
    code: str
    message: str


class BatchOutputLine(BaseModel):
    """One line of an output file (``response`` with a 2xx status) or error file (``response`` with the
    route's error, or ``error`` for a line that never reached a route: not JSON, cancelled, expired)."""

    id: str
    custom_id: Optional[str]
    response: Optional[BatchLineResponse] = None
    error: Optional[BatchLineError] = None
