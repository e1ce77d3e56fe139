"""A workload: the requests to replay, in OpenAI's Batch input format, with the answers they got (if known).

A workload file is a Batch API input file (``{"custom_id", "method", "url", "body"}`` per line), so the same
file runs on OpenAI's Batch API, on tgi_nb's, or through :func:`~tgi_nb.migrate.replay`. The answers it got
(the reference for a replay) are a Batch API output file beside it, ``<name>.responses.jsonl``: what
:func:`~tgi_nb.migrate.record` writes, and what OpenAI's Batch API gives back for the same input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

# The routes a workload may hold (those of OpenAI's Batch API that tgi_nb serves).
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")


def responses_path(path: Union[str, Path]) -> Path:
    """Where the answers of the workload at ``path`` are kept.

    Example:
        >>> responses_path("runs/workload.jsonl").as_posix()
        'runs/workload.responses.jsonl'
    """
    path = Path(path)
    stem = path.name[:-len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    return path.with_name(stem + ".responses.jsonl")


@dataclass
class WorkItem:
    """One request: its ``body`` POSTed to ``url``, and the answer it got (``reference``: the response body, or
    None when unknown; ``reference_status``: its HTTP status)."""

    custom_id: str
    url: str
    body: dict[str, Any]
    reference: Optional[Any] = None
    reference_status: Optional[int] = None

    def batch_line(self) -> dict[str, Any]:
        """The request as a line of a Batch API input file."""
        return {"custom_id": self.custom_id, "method": "POST", "url": self.url, "body": self.body}


@dataclass
class Workload:
    """Requests to replay, each with the answer it got when known.

    Example:
        >>> w = Workload.of([{"messages": [{"role": "user", "content": "Hi"}], "model": "gpt-4o-mini"},
        ...                  {"prompt": "Once upon", "max_tokens": 5}])
        >>> [(i.custom_id, i.url) for i in w]
        [('request-1', '/v1/chat/completions'), ('request-2', '/v1/completions')]
    """

    items: list[WorkItem] = field(default_factory=list)

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> WorkItem:
        return self.items[index]

    @classmethod
    def of(cls, source: Any) -> "Workload":
        """A workload from a :class:`Workload`, a path to a Batch input file, or request dicts (Batch input
        lines, or bare chat / completions bodies, told apart by ``messages`` and ``prompt``)."""
        if isinstance(source, Workload):
            return source
        if isinstance(source, (str, Path)):
            return cls.load(source)
        if isinstance(source, dict):
            source = [source]
        return cls([_item(request, n) for n, request in enumerate(source, start=1)])

    @classmethod
    def load(cls, path: Union[str, Path], responses: Union[None, str, Path] = None) -> "Workload":
        """Read a Batch input file and, when there is one, its answers (``responses``, by default
        ``<name>.responses.jsonl`` beside it: a Batch output file, matched by ``custom_id``)."""
        items = [_item(line, n) for n, line in enumerate(_read_jsonl(path), start=1)]
        workload = cls(items)
        responses = Path(responses) if responses is not None else responses_path(path)
        if responses.exists():
            workload.attach_responses(_read_jsonl(responses))
        return workload

    def attach_responses(self, lines: Iterable[dict[str, Any]]) -> None:
        """Take each item's reference from Batch output lines (``custom_id`` and ``response``)."""
        by_id = {item.custom_id: item for item in self.items}
        for line in lines:
            item = by_id.get(line.get("custom_id"))
            response = line.get("response")
            if item is not None and isinstance(response, dict):
                item.reference, item.reference_status = response.get("body"), response.get("status_code")

    def save(self, path: Union[str, Path]) -> Path:
        """Write the requests as a Batch input file and, when any has an answer, the answers beside it."""
        path = Path(path)
        path.write_text("".join(json.dumps(item.batch_line()) + "\n" for item in self.items))
        answered = [item for item in self.items if item.reference is not None]
        if answered:
            responses_path(path).write_text("".join(
                json.dumps({"id": f"batch_req_{item.custom_id}", "custom_id": item.custom_id,
                            "response": {"status_code": item.reference_status or 200, "request_id": "",
                                         "body": item.reference}, "error": None}) + "\n" for item in answered))
        return path


def _read_jsonl(path: Union[str, Path]) -> list[dict[str, Any]]:
    lines = []
    for number, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        if raw.strip():
            try:
                lines.append(json.loads(raw))
            except ValueError as exc:
                raise ValueError(f"{path}, line {number}: not JSON ({exc})") from None
    return lines


def _item(request: Any, number: int) -> WorkItem:
    if not isinstance(request, dict):
        raise TypeError(f"request {number}: expected a dict (a Batch input line or a request body), got "
                        f"{type(request).__name__}")
    if "body" in request and "url" in request:
        url = request["url"]
        if url not in ENDPOINTS:
            raise ValueError(f"request {number}: url must be one of {', '.join(ENDPOINTS)}, got {url!r}")
        return WorkItem(str(request.get("custom_id") or f"request-{number}"), url, dict(request["body"]))
    if "messages" in request:
        return WorkItem(f"request-{number}", "/v1/chat/completions", dict(request))
    if "prompt" in request:
        return WorkItem(f"request-{number}", "/v1/completions", dict(request))
    raise ValueError(f"request {number}: a Batch input line ({{custom_id, method, url, body}}) or a chat "
                     f"(messages) or completions (prompt) body, got keys {sorted(request)}")
