"""OpenAI's Batch API on this server: ``/v1/batches`` over the files of ``/v1/files``.

A batch is checked when it is created (a 400 naming the problem: an input file that is not ``purpose="batch"``,
more than ``max_batch_requests`` lines, a ``custom_id`` used twice, another endpoint than
:data:`~tgi_nb.server.batch_runner.BATCH_ENDPOINTS`), then runs in the background on the server's event loop,
each line through the server's own route at a lower priority than interactive requests
(:mod:`~tgi_nb.server.batch_runner`). A line that is malformed or that its route refuses goes to the error
file; the others complete. ``request_counts`` move as lines finish; ``cancel`` stops the lines in flight
(their KV blocks are freed at once) and records the rest as cancelled.

Batches are recorded under the files folder (``batches/<id>.json``). A server stopped while a batch runs
runs it again from its first line when it starts on the same folder (``tgi-nb serve --files-dir``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from .batch_protocol import COMPLETION_WINDOWS, Batch, BatchCreateRequest, BatchError, BatchErrors, BatchList
from .batch_runner import BATCH_ENDPOINTS, BatchOutputs, LineRunner
from .errors import BadRequest, NotFound
from .files import FilesStore, page

logger = logging.getLogger("tgi_nb.server")


def _now() -> int:
    return int(time.time())


def scan_input(path: Path, max_requests: int) -> tuple[int, Optional[str]]:
    """(number of requests, the first line's ``body.model``) of a batch input file; a 400 when it has none,
    more than ``max_requests``, or a ``custom_id`` on two lines. Lines that are not JSON are counted: they go
    to the error file when the batch runs.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "in.jsonl"
        >>> _ = p.write_text('{"custom_id": "a", "body": {"model": "m"}}\\n\\nnot json\\n')
        >>> scan_input(p, 10)
        (2, 'm')
        >>> _ = p.write_text('{"custom_id": "a"}\\n{"custom_id": "a"}\\n')
        >>> scan_input(p, 10)
        Traceback (most recent call last):
        ...
        tgi_nb.server.errors.BadRequest: input_file_id: custom_id 'a' is on lines 1 and 2; each request needs its own
    """
    seen: dict[str, int] = {}
    total, model = 0, None
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            total += 1
            if total > max_requests:
                raise BadRequest(f"input_file_id: the file has more than {max_requests:,} requests, this server's "
                                 f"limit (max_batch_requests); split it into several batches",
                                 param="input_file_id", code="too_many_requests")
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(line, dict):
                continue
            custom_id = line.get("custom_id")
            if isinstance(custom_id, str):
                if custom_id in seen:
                    raise BadRequest(f"input_file_id: custom_id {custom_id!r} is on lines {seen[custom_id]} and "
                                     f"{number}; each request needs its own", param="input_file_id",
                                     code="duplicate_custom_id")
                seen[custom_id] = number
            body = line.get("body")
            if model is None and isinstance(body, dict) and isinstance(body.get("model"), str):
                model = body["model"]
    if total == 0:
        raise BadRequest("input_file_id: the file has no requests (one JSON object per line)", param="input_file_id",
                         code="empty_file")
    return total, model


def _check_metadata(metadata: Optional[dict[str, str]]) -> None:
    if metadata is None:
        return
    if len(metadata) > 16:
        raise BadRequest(f"metadata: at most 16 keys, got {len(metadata)}", param="metadata")
    for key, value in metadata.items():
        if len(key) > 64 or len(value) > 512:
            raise BadRequest(f"metadata: keys are at most 64 characters and values 512, got {key!r}", param="metadata")


class BatchService:
    """The batches of one server: created, listed, cancelled here, run by a :class:`LineRunner`.

    :meth:`start` (when the server starts, on its event loop) runs again the batches a stopped server left
    unfinished; :meth:`stop` (when it stops) drops the lines in flight without recording them.

    Example (what ``build_app`` does; the routes then call ``create``, ``get``, ``list``, ``cancel``):
        service = BatchService(files, settings)
        service.app = app            # what lines go through: the app HTTP requests reach
        service.start()              # in the server's lifespan
    """

    def __init__(self, files: FilesStore, *, max_batch_requests: int, concurrency: int,
                 api_key: Optional[str] = None):
        self.files = files
        self.max_batch_requests = max_batch_requests
        self.concurrency = concurrency
        self.api_key = api_key
        self.app: Any = None
        self._batches: dict[str, Batch] = {}
        self._runs: dict[str, asyncio.Task] = {}
        self._runner: Optional[LineRunner] = None
        self._output_ttl: dict[str, int] = {}  # batch id -> seconds its output files live
        self._loaded = False

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Begin serving batches on the running event loop; resume those a previous server left running."""
        self._runner = LineRunner(self.concurrency, self.api_key)
        self._runner.app = self.app
        self._batches.clear()  # read again: a temporary folder was removed when the server last stopped
        self._loaded = False
        self._load()
        for batch in self._batches.values():
            if not batch.done:
                self._launch(batch)

    def stop(self) -> None:
        """Stop every run now (on the loop's thread, before the server ends its requests): the lines in flight
        are cancelled and not recorded, so the batch stays unfinished and runs again from its start."""
        for task in self._runs.values():
            task.cancel()
        self._runs.clear()

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for record in self._folder.glob("batch_*.json"):
            try:
                batch = Batch.model_validate_json(record.read_bytes())
            except ValueError:
                continue
            self._batches[batch.id] = batch

    @property
    def _folder(self) -> Path:
        return self.files.scratch("batches")

    def _save(self, batch: Batch) -> None:
        record = self._folder / f"{batch.id}.json"
        tmp = record.with_suffix(".tmp")
        tmp.write_text(batch.model_dump_json())
        os.replace(tmp, record)

    def _move(self, batch: Batch, status: str) -> None:
        batch.status = status  # type: ignore[assignment]
        setattr(batch, f"{status}_at", _now())
        self._save(batch)

    # -- the API -------------------------------------------------------------------------------
    async def create(self, req: BatchCreateRequest) -> Batch:
        """POST /v1/batches: check the request and its input file, then start the batch."""
        if req.endpoint not in BATCH_ENDPOINTS:
            raise BadRequest(f"endpoint: must be one of {', '.join(BATCH_ENDPOINTS)}, got {req.endpoint!r}",
                             param="endpoint")
        if req.completion_window not in COMPLETION_WINDOWS:
            raise BadRequest(f"completion_window: must be one of {', '.join(COMPLETION_WINDOWS)}, got "
                             f"{req.completion_window!r}", param="completion_window")
        _check_metadata(req.metadata)
        try:
            input_file = self.files.get(req.input_file_id)
        except NotFound:
            raise NotFound(f"No such File object: {req.input_file_id}", param="input_file_id",
                           code="file_not_found") from None
        if input_file.purpose != "batch":
            raise BadRequest(f"input_file_id: {input_file.id} has purpose {input_file.purpose!r}; a batch reads a "
                             f"file uploaded with purpose 'batch'", param="input_file_id")
        self.files.check_room()
        total, model = await asyncio.to_thread(scan_input, self.files.path(input_file.id), self.max_batch_requests)
        now = _now()
        batch = Batch(id=f"batch_{uuid.uuid4().hex[:24]}", endpoint=req.endpoint, model=model,
                      input_file_id=input_file.id, completion_window=req.completion_window, created_at=now,
                      expires_at=now + COMPLETION_WINDOWS[req.completion_window], metadata=req.metadata)
        batch.request_counts.total = total
        if req.output_expires_after is not None:  # not part of OpenAI's Batch object: kept aside
            self._output_ttl[batch.id] = req.output_expires_after.seconds
        self._batches[batch.id] = batch
        self._save(batch)
        self._launch(batch)
        return batch

    def get(self, batch_id: str) -> Batch:
        """The batch, or a 404 naming ``batch_id``."""
        self._load()
        batch = self._batches.get(batch_id)
        if batch is None:
            raise NotFound(f"No such Batch object: {batch_id}", param="batch_id", code="batch_not_found")
        return batch

    def list(self, after: Optional[str], limit: int) -> BatchList:
        """Batches, newest first, ``limit`` after the one named ``after``."""
        self._load()
        batches = sorted(self._batches.values(), key=lambda b: (b.created_at, b.id), reverse=True)
        return BatchList.of(*page(batches, after, limit, "batch"))

    def cancel(self, batch_id: str) -> Batch:
        """Stop the batch: its lines in flight now, the others not run; ``cancelled`` once recorded."""
        batch = self.get(batch_id)
        if batch.status in ("cancelling", "cancelled"):
            return batch
        if batch.done or batch.status == "finalizing":
            raise BadRequest(f"batch_id: {batch_id} is {batch.status}; only a validating or in-progress batch can "
                             f"be cancelled", param="batch_id", code="batch_not_cancellable")
        self._move(batch, "cancelling")
        if self._runner is not None:
            self._runner.cancel_lines(batch)
        if batch.id not in self._runs:  # left cancelling by a server that stopped: nothing runs it
            self._finish(batch)
        return batch

    # -- running -------------------------------------------------------------------------------
    def _launch(self, batch: Batch) -> None:
        task = asyncio.ensure_future(self._run(batch))
        self._runs[batch.id] = task
        task.add_done_callback(lambda t: self._runs.pop(batch.id, None) if self._runs.get(batch.id) is t else None)

    def _stopping(self, batch: Batch) -> Optional[str]:
        if batch.status == "cancelling":
            return "batch_cancelled"
        if batch.expires_at is not None and time.time() >= batch.expires_at:
            batch.expired_at = batch.expired_at or _now()
            return "batch_expired"
        return None

    async def _run(self, batch: Batch) -> None:
        if batch.status == "cancelling":
            self._finish(batch)
            return
        if batch.status != "in_progress":
            self._move(batch, "in_progress")
        outputs = BatchOutputs(self._folder, batch)
        failure = None
        try:
            await self._runner.run(batch, self.files.path(batch.input_file_id), outputs,
                                   lambda: self._stopping(batch))
        except (NotFound, OSError) as exc:  # the input file was deleted before the batch could read it
            failure = f"the input file {batch.input_file_id} cannot be read: {exc}"
        finally:
            outputs.close()  # also when the server stops: the batch is left as it is, to run again
        if failure is None:
            self._finish(batch)
        else:
            self._fail(batch, failure)

    def _fail(self, batch: Batch, message: str) -> None:
        batch.errors = BatchErrors(data=[BatchError(code="input_file_unavailable", message=message,
                                                    param="input_file_id")])
        for kind in ("output", "error"):
            (self._folder / f"{batch.id}.{kind}.jsonl").unlink(missing_ok=True)
        self._move(batch, "failed")

    def _finish(self, batch: Batch) -> None:
        final = "cancelled" if batch.status == "cancelling" else "expired" if batch.expired_at else "completed"
        self._move(batch, "finalizing")
        ttl = self._output_ttl.pop(batch.id, None)
        for kind, attr in (("output", "output_file_id"), ("error", "error_file_id")):
            part = self._folder / f"{batch.id}.{kind}.jsonl"
            if part.exists() and part.stat().st_size:
                setattr(batch, attr, self.files.adopt(part, f"{batch.id}_{kind}.jsonl", "batch_output", ttl).id)
            else:
                part.unlink(missing_ok=True)
        self._move(batch, final)
        logger.info("batch %s %s: %d completed, %d failed of %d", batch.id, final, batch.request_counts.completed,
                    batch.request_counts.failed, batch.request_counts.total)
