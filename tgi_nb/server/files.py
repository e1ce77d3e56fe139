"""The files of ``/v1/files``: uploads for the Batch API and the batches' output and error files, in one folder.

The folder is ``ServerSettings.files_dir``, or, when that is None (endpoints, tests), a temporary folder made on
first use and removed when the server stops, so files go with the endpoint. Each file is ``<id>`` (its bytes)
and ``<id>.json`` (its :class:`~tgi_nb.server.batch_protocol.FileObject`); a server started again on the same
folder finds them. The folder is bounded: one upload at most ``max_file_bytes``, all files together at most
``max_files_bytes`` and ``max_files`` of them; beyond that an upload gets a 400 naming the limit.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Optional, Sequence

from .batch_protocol import FileObject
from .errors import BadRequest, NotFound

# What /v1/files accepts to store: the Batch API's input files. Output files are made by the server.
UPLOAD_PURPOSES = ("batch",)
_CHUNK = 1 << 20


def page(items: Sequence[Any], after: Optional[str], limit: int, kind: str) -> tuple[list[Any], bool]:
    """``limit`` of ``items`` (objects with an ``id``) after the one whose id is ``after``, and whether more
    follow: OpenAI's cursor pagination, which openai-python's ``SyncCursorPage`` follows.

    Example:
        >>> from types import SimpleNamespace as O
        >>> items = [O(id="a"), O(id="b"), O(id="c")]
        >>> [i.id for i in page(items, "a", 1, "file")[0]], page(items, "a", 1, "file")[1]
        (['b'], True)
    """
    start = 0
    if after is not None:
        ids = [item.id for item in items]
        if after not in ids:
            raise NotFound(f"after: no {kind} with id {after!r}", param="after")
        start = ids.index(after) + 1
    return list(items[start:start + limit]), start + limit < len(items)


def _too_large(what: str, size: int, limit: int, hint: str) -> BadRequest:
    return BadRequest(f"file: {what} is {size:,} bytes, more than this server's limit of {limit:,} bytes; {hint}",
                      param="file", code="file_too_large")


class FilesStore:
    """Files in a folder, with OpenAI's ids (``file-...``), bounded in size and count; thread-safe.

    Example:
        >>> import io
        >>> store = FilesStore(None, max_file_bytes=1000, max_files_bytes=2000, max_files=10)
        >>> f = store.upload(io.BytesIO(b'{"a": 1}\\n'), "in.jsonl", "batch")
        >>> f.bytes, f.purpose, store.read(f.id)
        (9, 'batch', b'{"a": 1}\\n')
        >>> store.close()   # a temporary folder: removed
    """

    def __init__(self, root: Optional[str], *, max_file_bytes: int, max_files_bytes: int, max_files: int):
        self._given = Path(root).expanduser() if root else None
        self._root: Optional[Path] = None
        self.max_file_bytes = max_file_bytes
        self.max_files_bytes = max_files_bytes
        self.max_files = max_files
        self._files: dict[str, FileObject] = {}
        self._lock = threading.RLock()

    # -- the folder ----------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        """The folder, made (and its files read) on first use."""
        with self._lock:
            if self._root is None:
                if self._given is None:
                    self._root = Path(tempfile.mkdtemp(prefix="tgi_nb-files-"))
                else:
                    self._given.mkdir(mode=0o700, parents=True, exist_ok=True)
                    self._root = self._given
                self._load()
            return self._root

    def _load(self) -> None:
        for meta in self._root.glob("file-*.json"):
            try:
                obj = FileObject.model_validate_json(meta.read_bytes())
            except ValueError:
                continue  # a half-written record of a crash: its file is not listed
            if (self._root / obj.id).is_file():
                self._files[obj.id] = obj

    def close(self) -> None:
        """Remove the folder if it is the temporary one (a given folder keeps its files)."""
        with self._lock:
            if self._root is not None and self._given is None:
                shutil.rmtree(self._root, ignore_errors=True)
                self._root = None
                self._files.clear()

    def scratch(self, name: str) -> Path:
        """A sub-folder for the server's own work files (batch records, output being written)."""
        path = self.root / name
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    # -- adding --------------------------------------------------------------------------------
    def check_room(self, size: int = 0) -> None:
        """Raise a 400 when ``size`` more bytes, in one more file, would not fit."""
        with self._lock:
            self._expire()
            if len(self._files) >= self.max_files:
                raise BadRequest(f"file: this server already stores {len(self._files)} files, its limit "
                                 f"(max_files); delete some with client.files.delete(file_id)", param="file",
                                 code="files_limit_reached")
            used = self.used_bytes
            if used + size > self.max_files_bytes:
                raise _too_large("the store with this file", used + size, self.max_files_bytes,
                                 "delete files with client.files.delete(file_id)")

    def upload(self, source: BinaryIO, filename: str, purpose: str, expires_after: Optional[int] = None
               ) -> FileObject:
        """Store what ``source`` holds (read in chunks, refused once past ``max_file_bytes``)."""
        if purpose not in UPLOAD_PURPOSES:
            raise BadRequest(f"purpose: must be one of {', '.join(UPLOAD_PURPOSES)} (this server stores files for "
                             f"the Batch API), got {purpose!r}", param="purpose")
        self.check_room()
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        path = self.root / file_id
        size = 0
        try:
            with open(path, "xb") as out:
                while chunk := source.read(_CHUNK):
                    size += len(chunk)
                    if size > self.max_file_bytes:
                        raise _too_large(repr(filename), size, self.max_file_bytes, "split it into several batches")
                    out.write(chunk)
            self.check_room(size)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return self._register(file_id, filename, purpose, size, expires_after)

    def adopt(self, path: Path, filename: str, purpose: str, expires_after: Optional[int] = None) -> FileObject:
        """Move a file the server wrote (a batch's output) into the store. Not refused when the store is full:
        the batch that wrote it already ran; uploads are refused until files are deleted."""
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        with self._lock:
            os.replace(path, self.root / file_id)
            return self._register(file_id, filename, purpose, (self.root / file_id).stat().st_size, expires_after)

    def _register(self, file_id: str, filename: str, purpose: str, size: int, expires_after: Optional[int]
                  ) -> FileObject:
        now = int(time.time())
        obj = FileObject(id=file_id, bytes=size, created_at=now, filename=filename, purpose=purpose,
                         expires_at=now + expires_after if expires_after else None)
        meta = self.root / f"{file_id}.json"
        tmp = meta.with_suffix(".tmp")
        tmp.write_text(obj.model_dump_json())
        os.replace(tmp, meta)  # atomic: a crash never leaves half a record
        with self._lock:
            self._files[file_id] = obj
        return obj

    # -- reading -------------------------------------------------------------------------------
    def get(self, file_id: str) -> FileObject:
        """The file's record, or a 404 naming ``file_id``."""
        with self._lock:
            self.root  # noqa: B018 - a given folder is read on first use
            self._expire()
            obj = self._files.get(file_id)
        if obj is None:
            raise NotFound(f"No such File object: {file_id}", param="file_id", code="file_not_found")
        return obj

    def path(self, file_id: str) -> Path:
        """Where the file's bytes are (after :meth:`get` found it)."""
        return self.root / self.get(file_id).id

    def read(self, file_id: str) -> bytes:
        return self.path(file_id).read_bytes()

    def list(self, purpose: Optional[str] = None, order: str = "desc") -> list[FileObject]:
        """Every file (of ``purpose`` when given), newest first unless ``order="asc"``."""
        with self._lock:
            self.root  # noqa: B018 - a given folder is read on first use
            self._expire()
            files = [f for f in self._files.values() if purpose is None or f.purpose == purpose]
        files.sort(key=lambda f: (f.created_at, f.id), reverse=order != "asc")
        return files

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(f.bytes for f in self._files.values())

    # -- removing ------------------------------------------------------------------------------
    def delete(self, file_id: str) -> None:
        """Remove the file (a 404 if there is none). A batch reading it keeps its open handle."""
        with self._lock:
            obj = self.get(file_id)
            self._remove(obj.id)

    def _remove(self, file_id: str) -> None:
        self._files.pop(file_id, None)
        (self.root / f"{file_id}.json").unlink(missing_ok=True)
        (self.root / file_id).unlink(missing_ok=True)

    def _expire(self) -> None:
        now = time.time()
        for file_id in [i for i, f in self._files.items() if f.expires_at is not None and f.expires_at <= now]:
            self._remove(file_id)


# Multipart overhead allowed on top of max_file_bytes before a request is refused unread.
_FORM_OVERHEAD = 64 * 1024


async def receive_upload(request: Any, store: FilesStore) -> FileObject:
    """POST /v1/files: the multipart form openai-python sends (``file``, ``purpose``,
    ``expires_after[seconds]``), refused before it is read when its Content-Length is over the limit."""
    import asyncio

    from starlette.datastructures import UploadFile

    length = request.headers.get("content-length", "")
    if not length.isdigit():
        raise BadRequest("file: an upload needs a Content-Length header (openai-python and curl -F send one)",
                         param="file")
    if int(length) > store.max_file_bytes + _FORM_OVERHEAD:
        raise _too_large("the upload", int(length), store.max_file_bytes, "split it into several batches")
    form = await request.form(max_files=1, max_fields=8)
    try:
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise BadRequest("file: required, as the file part of a multipart/form-data body", param="file")
        if not isinstance(purpose, str):
            raise BadRequest(f"purpose: required, one of {', '.join(UPLOAD_PURPOSES)}", param="purpose")
        seconds = form.get("expires_after[seconds]")
        expires_after = None
        if seconds is not None:
            if not (isinstance(seconds, str) and seconds.isdigit() and 3600 <= int(seconds) <= 2592000):
                raise BadRequest(f"expires_after.seconds: must be an integer in [3600, 2592000], got {seconds!r}",
                                 param="expires_after")
            expires_after = int(seconds)
        return await asyncio.to_thread(store.upload, upload.file, upload.filename or "upload.jsonl", purpose,
                                       expires_after)
    finally:
        await form.close()
