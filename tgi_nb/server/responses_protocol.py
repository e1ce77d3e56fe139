"""Request, response, item and event models of OpenAI's Responses API (/v1/responses).

Shapes are openai-python's ``types/responses`` ones, so ``client.responses.create``, the ``responses.stream``
helper (and its ``get_final_response()``), the npm package's accumulator, LangChain's
``ChatOpenAI(use_responses_api=True)`` and the Agents SDK read them as they read OpenAI's. Streamed events
carry a ``sequence_number`` counting from 0.

Example:
    >>> ResponsesRequest(input="Hi", store=False).store
    False
    >>> OutputText(text="Hello").model_dump()
    {'type': 'output_text', 'text': 'Hello', 'annotations': [], 'logprobs': []}
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, Field

from .protocol import _Request

ItemStatus = Literal["in_progress", "completed", "incomplete"]
ResponseStatus = Literal["completed", "failed", "in_progress", "cancelled", "queued", "incomplete"]


class ResponsesRequest(_Request):
    """POST /v1/responses. Tools, ``tool_choice`` and ``text.format`` are checked (400s naming the field) in
    responses_input.py; the sampling fields after ``reasoning`` are the usual open-server extensions."""

    model: Optional[str] = None
    input: Union[str, list[dict[str, Any]]]
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, ge=0, le=1)
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    text: Optional[dict[str, Any]] = None
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    store: Optional[bool] = True
    previous_response_id: Optional[str] = None
    metadata: Optional[dict[str, str]] = None
    user: Optional[str] = None
    reasoning: Optional[dict[str, Any]] = None
    include: Optional[list[str]] = None
    truncation: Optional[str] = None
    # Refused when set (400 naming them): what this server does not build.
    background: Optional[bool] = None
    conversation: Optional[Any] = None
    prompt: Optional[Any] = None
    top_logprobs: Optional[int] = None
    max_tool_calls: Optional[int] = None
    # Accepted, with no effect on a single local model.
    service_tier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    safety_identifier: Optional[str] = None
    # Extensions, as on chat completions.
    seed: Optional[int] = None
    top_k: Optional[int] = Field(default=None, ge=-1)
    min_p: Optional[float] = Field(default=None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(default=None, gt=0)
    presence_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    chat_template_kwargs: Optional[dict[str, Any]] = None


# ----------------------------------------------------------------------------------------------
# Output items
# ----------------------------------------------------------------------------------------------

class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str = ""
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str = ""


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ItemStatus = "in_progress"
    content: list[OutputText] = Field(default_factory=list)


class FunctionCallItem(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str = ""
    status: ItemStatus = "in_progress"


class ReasoningItem(BaseModel):
    """The model's thinking: its text in ``content`` (``reasoning_text`` parts, as vLLM and gpt-oss send it);
    no summary is written, so ``summary`` stays empty."""

    id: str
    type: Literal["reasoning"] = "reasoning"
    summary: list[Any] = Field(default_factory=list)
    content: list[ReasoningText] = Field(default_factory=list)
    encrypted_content: Optional[str] = None
    status: ItemStatus = "in_progress"


OutputItem = Union[OutputMessage, FunctionCallItem, ReasoningItem]


# ----------------------------------------------------------------------------------------------
# The response
# ----------------------------------------------------------------------------------------------

class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int = 0
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int = 0
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int = 0


class ResponseError(BaseModel):
    code: str = "server_error"
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus = "in_progress"
    background: bool = False
    completed_at: Optional[int] = None
    error: Optional[ResponseError] = None
    incomplete_details: Optional[IncompleteDetails] = None
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = None
    metadata: dict[str, str] = Field(default_factory=dict)
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: Optional[str] = None
    reasoning: Optional[dict[str, Any]] = None
    store: bool = True
    temperature: Optional[float] = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: Union[str, dict[str, Any]] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_p: Optional[float] = None
    truncation: str = "disabled"
    usage: Optional[ResponseUsage] = None
    user: Optional[str] = None


class InputItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: Optional[str] = None
    last_id: Optional[str] = None
    has_more: bool = False


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


# ----------------------------------------------------------------------------------------------
# Streamed events (server-sent, in the order OpenAI sends them)
# ----------------------------------------------------------------------------------------------

class ResponseEvent(BaseModel):
    type: str
    sequence_number: int = 0


class ResponseLifecycleEvent(ResponseEvent):
    """response.created / in_progress / completed / incomplete / failed."""

    response: ResponseObject


class OutputItemEvent(ResponseEvent):
    """response.output_item.added / done."""

    output_index: int
    item: OutputItem


class _ItemEvent(ResponseEvent):
    """An event about one output item."""

    item_id: str
    output_index: int


class _PartEvent(_ItemEvent):
    """An event about one content part of an item (there is one per item here)."""

    content_index: int = 0


class ContentPartEvent(_PartEvent):
    """response.content_part.added / done (an ``output_text`` or a ``reasoning_text`` part)."""

    part: Union[OutputText, ReasoningText]


class TextDeltaEvent(_PartEvent):
    """response.output_text.delta and response.reasoning_text.delta (this one without ``logprobs``)."""

    delta: str
    logprobs: Optional[list[Any]] = Field(default=None, exclude_if=lambda v: v is None)


class TextDoneEvent(_PartEvent):
    """response.output_text.done and response.reasoning_text.done."""

    text: str
    logprobs: Optional[list[Any]] = Field(default=None, exclude_if=lambda v: v is None)


class ArgumentsDeltaEvent(_ItemEvent):
    delta: str


class ArgumentsDoneEvent(_ItemEvent):
    name: str
    arguments: str
