"""OpenAI's Files and Batch API routes, ``/v1/files`` and ``/v1/batches`` (thin: the logic lives in files.py,
batches.py and batch_runner.py)."""

from __future__ import annotations

from typing import Literal, Optional

from fastapi import APIRouter, Query, Request
from starlette.responses import FileResponse

from .batch_protocol import Batch, BatchCreateRequest, BatchList, FileDeleted, FileList, FileObject
from .batches import BatchService
from .files import UPLOAD_PURPOSES, FilesStore, page, receive_upload
from .protocol import OpenAIError

router = APIRouter(tags=["Files and batches"])

_ERRORS = {code: {"model": OpenAIError} for code in (400, 401, 404, 503)}
# The form is read by the handler itself (so that an upload over the limit is refused unread): documented here.
_UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary"},
                   "purpose": {"type": "string", "enum": list(UPLOAD_PURPOSES)}}}}}}}


def _files(request: Request) -> FilesStore:
    return request.app.state.files


def _batches(request: Request) -> BatchService:
    return request.app.state.batches


@router.post("/v1/files", response_model=FileObject, responses=_ERRORS, openapi_extra=_UPLOAD_BODY)
async def create_file(request: Request) -> FileObject:
    """Upload a JSONL file of requests for the Batch API (multipart: ``file``, ``purpose="batch"``)."""
    return await receive_upload(request, _files(request))


@router.get("/v1/files", response_model=FileList, responses=_ERRORS)
async def list_files(request: Request, purpose: Optional[str] = None, limit: int = Query(10000, ge=1, le=10000),
                     order: Literal["asc", "desc"] = "desc", after: Optional[str] = None) -> FileList:
    """The stored files (uploads and batch outputs), newest first unless ``order=asc``."""
    return FileList.of(*page(_files(request).list(purpose, order), after, limit, "file"))


@router.get("/v1/files/{file_id}", response_model=FileObject, responses=_ERRORS)
async def retrieve_file(file_id: str, request: Request) -> FileObject:
    """One file's record."""
    return _files(request).get(file_id)


@router.delete("/v1/files/{file_id}", response_model=FileDeleted, responses=_ERRORS)
async def delete_file(file_id: str, request: Request) -> FileDeleted:
    """Delete a file."""
    _files(request).delete(file_id)
    return FileDeleted(id=file_id)


@router.get("/v1/files/{file_id}/content", responses={200: {"content": {"application/octet-stream": {}}}, **_ERRORS})
async def file_content(file_id: str, request: Request) -> FileResponse:
    """A file's bytes (a batch's output or error file: one JSON line per request)."""
    return FileResponse(_files(request).path(file_id), media_type="application/octet-stream")


@router.post("/v1/batches", response_model=Batch, responses=_ERRORS)
async def create_batch(body: BatchCreateRequest, request: Request) -> Batch:
    """Run every request of an uploaded JSONL file in the background, at a lower priority than interactive ones."""
    return await _batches(request).create(body)


@router.get("/v1/batches", response_model=BatchList, responses=_ERRORS)
async def list_batches(request: Request, limit: int = Query(20, ge=1, le=100), after: Optional[str] = None
                       ) -> BatchList:
    """Batches, newest first."""
    return _batches(request).list(after, limit)


@router.get("/v1/batches/{batch_id}", response_model=Batch, responses=_ERRORS)
async def retrieve_batch(batch_id: str, request: Request) -> Batch:
    """A batch: its status, ``request_counts`` (they move while it runs) and, once done, its output files."""
    return _batches(request).get(batch_id)


@router.post("/v1/batches/{batch_id}/cancel", response_model=Batch, responses=_ERRORS)
async def cancel_batch(batch_id: str, request: Request) -> Batch:
    """Cancel a batch: ``cancelling`` at once, ``cancelled`` once its lines in flight stopped."""
    return _batches(request).cancel(batch_id)
