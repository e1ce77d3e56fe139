"""The /v1/responses routes' logic: one response, streamed as OpenAI's typed events or not, kept in the
store (responses_store.py) when ``store`` is true.

The request becomes a chat request (responses_input.py) and runs on the one chat generation path
(generation.py: template, tools, grammar, reasoning); this module only turns each sample's parsed pieces into
output items. A stream sends, each event with its ``sequence_number``::

    response.created, response.in_progress,
    per item:  response.output_item.added
               reasoning: content_part.added (reasoning_text), reasoning_text.delta..., reasoning_text.done,
                          content_part.done
               message:   content_part.added (output_text), output_text.delta..., output_text.done,
                          content_part.done
               function_call: function_call_arguments.delta..., function_call_arguments.done
               response.output_item.done
    response.completed | response.incomplete (max_output_tokens; or cancelled) | response.failed

Example (the openai SDK):
    with client.responses.stream(model="tgi", input="Hi") as stream:   # doctest: +SKIP
        for event in stream: ...
        final = stream.get_final_response()
"""

from __future__ import annotations

import itertools
import time
from typing import AsyncIterator, Optional

from starlette.requests import Request
from starlette.responses import Response

from .context import ServerContext
from .errors import APIError, BadRequest
from .generation import ChatRun, ParsedDelta, error_kind, internal_error, start_chat
from .params import log_ignored
from .protocol import ignored_fields
from .responses_input import (chat_request, input_messages, item_id, output_message, reject_unsupported,
                              rename_error)
from .responses_protocol import (ArgumentsDeltaEvent, ArgumentsDoneEvent, ContentPartEvent, DeletedResponse,
                                 FunctionCallItem, IncompleteDetails, InputItemList, InputTokensDetails,
                                 OutputItem, OutputItemEvent, OutputMessage, OutputText, OutputTokensDetails,
                                 ReasoningItem, ReasoningText, ResponseError, ResponseEvent,
                                 ResponseLifecycleEvent, ResponseObject, ResponsesRequest, ResponseUsage,
                                 TextDeltaEvent, TextDoneEvent)
from .responses_store import StoredResponse
from .streaming import KEEP_ALIVE, SSE_KEEP_ALIVE, ClientDisconnected, SSEResponse, check_finished


class ResponseCancelled(Exception):
    """POST /v1/responses/{id}/cancel (or DELETE) stopped a running response."""


class OutputBuilder:
    """A response's output items, built from one sample's parsed pieces, and the events that build them.

    Example:
        >>> b = OutputBuilder()
        >>> [e.type for e in b.add(ParsedDelta(reasoning="Hm.", content="Hi"))]  # doctest: +NORMALIZE_WHITESPACE
        ['response.output_item.added', 'response.content_part.added', 'response.reasoning_text.delta',
         'response.reasoning_text.done', 'response.content_part.done', 'response.output_item.done',
         'response.output_item.added', 'response.content_part.added', 'response.output_text.delta']
        >>> [item.type for item in b.items], b.text
        (['reasoning', 'message'], 'Hi')
    """

    def __init__(self) -> None:
        self.items: list[OutputItem] = []
        self._open: Optional[OutputItem] = None

    @property
    def text(self) -> str:
        """The output text (what the SDK's ``output_text`` joins)."""
        return "".join(p.text for item in self.items if isinstance(item, OutputMessage) for p in item.content)

    def _start(self, item: OutputItem, part: Optional[OutputText | ReasoningText] = None) -> list[ResponseEvent]:
        events: list[ResponseEvent] = self.close()
        self.items.append(item)
        self._open = item
        index = len(self.items) - 1
        events.append(OutputItemEvent(type="response.output_item.added", output_index=index,
                                      item=item.model_copy(deep=True)))
        if part is not None:
            events.append(ContentPartEvent(type="response.content_part.added", item_id=item.id, output_index=index,
                                           part=part.model_copy()))
            item.content.append(part)
        return events

    def _text(self, kind: type, text: str) -> list[ResponseEvent]:
        events: list[ResponseEvent] = []
        if not isinstance(self._open, kind):
            if kind is ReasoningItem:
                events += self._start(ReasoningItem(id=item_id("rs")), ReasoningText())
            else:
                events += self._start(OutputMessage(id=item_id("msg")), OutputText())
        item = self._open
        item.content[0].text += text
        name = "reasoning_text" if kind is ReasoningItem else "output_text"
        events.append(TextDeltaEvent(type=f"response.{name}.delta", item_id=item.id, output_index=len(self.items) - 1,
                                     delta=text, logprobs=None if kind is ReasoningItem else []))
        return events

    def add(self, piece: ParsedDelta) -> list[ResponseEvent]:
        """The events for a piece of output (opening and closing items as it moves on)."""
        events: list[ResponseEvent] = []
        if piece.reasoning:
            events += self._text(ReasoningItem, piece.reasoning)
        if piece.content:
            events += self._text(OutputMessage, piece.content)
        for call in piece.tool_calls:
            if "id" in call:  # the first delta of a call: its id and name
                events += self._start(FunctionCallItem(id="fc_" + call["id"].removeprefix("call_"),
                                                       call_id=call["id"], name=call["function"]["name"]))
            fragment = call["function"].get("arguments", "")
            if fragment and isinstance(self._open, FunctionCallItem):
                self._open.arguments += fragment
                events.append(ArgumentsDeltaEvent(type="response.function_call_arguments.delta",
                                                  item_id=self._open.id, output_index=len(self.items) - 1,
                                                  delta=fragment))
        return events

    def close(self, status: str = "completed") -> list[ResponseEvent]:
        """The events that finish the open item (none if none is open)."""
        item, self._open = self._open, None
        if item is None:
            return []
        index = len(self.items) - 1
        events: list[ResponseEvent] = []
        if isinstance(item, FunctionCallItem):
            events.append(ArgumentsDoneEvent(type="response.function_call_arguments.done", item_id=item.id,
                                             output_index=index, name=item.name, arguments=item.arguments))
        else:
            name = "reasoning_text" if isinstance(item, ReasoningItem) else "output_text"
            part = item.content[0]
            events.append(TextDoneEvent(type=f"response.{name}.done", item_id=item.id, output_index=index,
                                        text=part.text, logprobs=[] if name == "output_text" else None))
            events.append(ContentPartEvent(type="response.content_part.done", item_id=item.id, output_index=index,
                                           part=part.model_copy()))
        item.status = status
        events.append(OutputItemEvent(type="response.output_item.done", output_index=index,
                                      item=item.model_copy(deep=True)))
        return events


def _new_response(ctx: ServerContext, req: ResponsesRequest, response_id: str) -> ResponseObject:
    return ResponseObject(
        id=response_id, created_at=int(time.time()), model=ctx.served_model_name, instructions=req.instructions,
        max_output_tokens=req.max_output_tokens, metadata=req.metadata or {},
        parallel_tool_calls=req.parallel_tool_calls is not False, previous_response_id=req.previous_response_id,
        reasoning={"effort": None, "summary": None, **req.reasoning} if req.reasoning else None,
        store=req.store is not False, temperature=1.0 if req.temperature is None else req.temperature,
        text={"format": {"type": "text"}, **(req.text or {})}, tool_choice=req.tool_choice or "auto",
        tools=req.tools or [], top_p=1.0 if req.top_p is None else req.top_p, user=req.user)


class ResponseJob:
    """One response being generated: parses its output into items, finishes it, keeps the store's copy current
    (the stored entry and this job share the same :class:`ResponseObject`)."""

    def __init__(self, ctx: ServerContext, run: ChatRun, entry: StoredResponse):
        self.ctx, self.run, self.entry = ctx, run, entry
        self.response = entry.response
        self.parser = run.parser()
        self.builder = OutputBuilder()
        self.finish_reason: Optional[str] = None
        self.cached = 0
        entry.cancel = self.cancel

    def cancel(self) -> None:
        self.response.status = "cancelled"
        self.run.stream.interrupt(ResponseCancelled(), outcome="cancelled")

    def feed(self, out) -> list[ResponseEvent]:
        check_finished(out)
        self.cached = out.num_cached_tokens
        events: list[ResponseEvent] = []
        for d in out.outputs:
            events += self.builder.add(self.parser.feed(d.text, len(d.token_ids), d.finish_reason is not None))
            self.finish_reason = d.finish_reason or self.finish_reason
        return events

    def finish(self, status: str, error: Optional[APIError] = None) -> list[ResponseEvent]:
        """Close the output as ``status`` (completed, incomplete, cancelled or failed); the events that do."""
        response = self.response
        if status == "completed" and self.finish_reason == "length":
            status = "incomplete"
            response.incomplete_details = IncompleteDetails(reason="max_output_tokens")
        if response.status == "cancelled":
            status = "cancelled"
        events = self.builder.close("completed" if status == "completed" else "incomplete")
        stream = self.run.stream
        response.status = status
        response.output = self.builder.items
        response.completed_at = int(time.time()) if status == "completed" else None
        response.usage = ResponseUsage(
            input_tokens=len(self.run.prompt_ids), output_tokens=stream.generated[0],
            total_tokens=len(self.run.prompt_ids) + stream.generated[0],
            input_tokens_details=InputTokensDetails(cached_tokens=self.cached),
            output_tokens_details=OutputTokensDetails(reasoning_tokens=self.parser.reasoning_tokens))
        if error is not None:
            response.error = ResponseError(code="rate_limit_exceeded" if error.status_code == 429 else "server_error",
                                           message=error.message)
        self.entry.cancel = None
        if status in ("completed", "incomplete"):
            message = output_message(self.builder.items)
            if message is not None:
                self.entry.conversation = self.entry.conversation + [message]
        return events

    async def collect(self, request: Request) -> Response:
        """Run to the end and answer with the whole response."""
        stream = self.run.stream
        stream.watch_disconnect(request)
        try:
            try:
                async for _, out in stream.events():
                    self.feed(out)
                self.finish("completed")
                stream.succeed()
            except ResponseCancelled:
                self.finish("cancelled")
        except ClientDisconnected:
            self.finish("cancelled")
            return Response(status_code=499)
        except APIError as err:
            stream.fail(error_kind(err))
            self.finish("failed", err)
            raise
        finally:
            stream.close()
        return Response(self.response.model_dump_json(), media_type="application/json")

    async def events(self, request: Request) -> AsyncIterator[bytes]:
        """The response as server-sent events, each named by an ``event:`` line as OpenAI sends them."""
        stream = self.run.stream
        numbers = itertools.count()

        def emit(event: ResponseEvent) -> bytes:
            event.sequence_number = next(numbers)
            return f"event: {event.type}\ndata: {event.model_dump_json()}\n\n".encode()

        def lifecycle(kind: str) -> bytes:  # serialized now: later changes to the response are not in it
            return emit(ResponseLifecycleEvent(type=f"response.{kind}", response=self.response))

        stream.watch_disconnect(request)
        try:
            yield lifecycle("created")
            yield lifecycle("in_progress")
            status = "completed"
            try:
                async for event in stream.events(keep_alive=self.ctx.settings.keep_alive_interval):
                    if event is KEEP_ALIVE:
                        yield SSE_KEEP_ALIVE
                        continue
                    for item_event in self.feed(event[1]):
                        yield emit(item_event)
            except ResponseCancelled:
                status = "cancelled"
            for item_event in self.finish(status):
                yield emit(item_event)
            # There is no cancelled event: a cancelled response ends as incomplete, with that status.
            yield lifecycle("completed" if self.response.status == "completed" else "incomplete")
            stream.succeed()
        except ClientDisconnected:
            self.finish("cancelled")
        except Exception as exc:  # noqa: BLE001 - the client must learn the response failed, in OpenAI's shape
            err = exc if isinstance(exc, APIError) else internal_error(exc)
            stream.fail(error_kind(err) if isinstance(exc, APIError) else "internal")
            for item_event in self.finish("failed", err):
                yield emit(item_event)
            yield lifecycle("failed")


# ----------------------------------------------------------------------------------------------
# Routes
# ----------------------------------------------------------------------------------------------

async def create_response(ctx: ServerContext, req: ResponsesRequest, request: Request) -> Response:
    """POST /v1/responses."""
    log_ignored("/v1/responses", ignored_fields(req))
    reject_unsupported(req)
    previous = None
    if req.previous_response_id is not None:
        previous = ctx.responses.get(req.previous_response_id, param="previous_response_id")
        if previous.response.status == "in_progress":
            raise BadRequest(f"previous_response_id: {req.previous_response_id} is still in progress",
                             param="previous_response_id")
    response_id = item_id("resp")
    try:
        items, messages = input_messages(req.input)
        conversation = (previous.conversation if previous is not None else []) + messages
        run = await start_chat(ctx, chat_request(req, conversation), "responses", response_id,
                               effort_param="reasoning.effort")
    except BadRequest as err:
        raise rename_error(err) from None
    entry = StoredResponse(_new_response(ctx, req, response_id), items, conversation)
    if entry.response.store:
        ctx.responses.put(entry)
    job = ResponseJob(ctx, run, entry)
    if req.stream:
        return SSEResponse(job.events(request), on_close=run.stream.close)
    return await job.collect(request)


def retrieve_response(ctx: ServerContext, response_id: str, stream: bool = False) -> ResponseObject:
    """GET /v1/responses/{id}: the stored response as it is now (in progress, or finished)."""
    if stream:
        raise BadRequest("stream: a stored response cannot be streamed again; retrieve it without stream",
                         param="stream")
    return ctx.responses.get(response_id).response


def delete_response(ctx: ServerContext, response_id: str) -> DeletedResponse:
    """DELETE /v1/responses/{id} (a running one is stopped first)."""
    ctx.responses.delete(response_id)
    return DeletedResponse(id=response_id)


def cancel_response(ctx: ServerContext, response_id: str) -> ResponseObject:
    """POST /v1/responses/{id}/cancel: stop a response still in progress (its generation is aborted at once);
    a 400 for one that already finished."""
    entry = ctx.responses.get(response_id)
    if entry.cancel is None:
        raise BadRequest(f"response_id: {response_id} is {entry.response.status}; only a response in progress "
                         f"can be cancelled", param="response_id")
    entry.cancel()
    return entry.response


def list_input_items(ctx: ServerContext, response_id: str, after: Optional[str] = None, limit: int = 20,
                     order: str = "desc") -> InputItemList:
    """GET /v1/responses/{id}/input_items: the items the response was given (newest first by default)."""
    if order not in ("asc", "desc"):
        raise BadRequest(f"order: must be 'asc' or 'desc', got {order!r}", param="order")
    if not 1 <= limit <= 100:
        raise BadRequest(f"limit: must be in [1, 100], got {limit}", param="limit")
    items = ctx.responses.get(response_id).input_items
    items = items[::-1] if order == "desc" else list(items)
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise BadRequest(f"after: {after!r} is not an input item of {response_id}", param="after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return InputItemList(data=page, first_id=page[0]["id"] if page else None,
                         last_id=page[-1]["id"] if page else None, has_more=len(items) > limit)
