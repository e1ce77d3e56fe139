"""Request and response models of the OpenAI API and of TGI's own routes, in one place.

Request models accept unknown fields (``extra="allow"``) so that a client sending a parameter we do not
know still gets an answer; the route logs what it ignored (see :func:`ignored_fields`). Response models
serialize to exactly the shapes openai-python / openai-node and huggingface_hub parse: a field that
OpenAI sends as ``null`` is always present, a field OpenAI leaves out is left out when empty
(``exclude_if``).

Example:
    >>> req = ChatCompletionRequest(model="tgi", messages=[{"role": "user", "content": "Hi"}], foo=1)
    >>> ignored_fields(req)
    ['foo']
    >>> ChatDelta(content="Hi").model_dump()
    {'content': 'Hi'}
"""

from __future__ import annotations

import time
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

# Fields whose absence and null mean the same to every client we know; leaving them out keeps
# streamed chunks small.
_OMIT = dict(default=None, exclude_if=lambda v: v is None)


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


def ignored_fields(request: BaseModel) -> list[str]:
    """Names of the fields a request carried that no model field knows (they are ignored).

    Example:
        >>> ignored_fields(CompletionRequest(prompt="x", frobnicate=True))
        ['frobnicate']
    """
    return sorted((request.model_extra or {}).keys())


# ----------------------------------------------------------------------------------------------
# OpenAI: shared pieces
# ----------------------------------------------------------------------------------------------

class StreamOptions(_Request):
    include_usage: bool = False


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: Optional[PromptTokensDetails] = Field(**_OMIT)
    # Only when a reasoning parser ran: tokens spent thinking, as OpenAI's reasoning models report them.
    completion_tokens_details: Optional[CompletionTokensDetails] = Field(**_OMIT)


class _SamplingFields(_Request):
    """Parameters chat and completions share (OpenAI's, plus the usual open-server extensions)."""

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, ge=0, le=1)
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    presence_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None
    seed: Optional[int] = None
    user: Optional[str] = None
    # Extensions of vLLM / TGI that OpenAI-based code sends through ``extra_body``.
    top_k: Optional[int] = Field(default=None, ge=-1)
    min_p: Optional[float] = Field(default=None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(default=None, gt=0)
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    # vLLM's structured outputs: the ``guided_*`` fields and the newer ``structured_outputs`` object
    # ({"json" | "regex" | "choice" | "grammar" | "json_object": ...}); see guided.py.
    guided_json: Optional[Union[dict[str, Any], str]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    structured_outputs: Optional[dict[str, Any]] = None


# ----------------------------------------------------------------------------------------------
# OpenAI: chat completions
# ----------------------------------------------------------------------------------------------

class ChatMessage(_Request):
    """One input message. ``content`` is a string or a list of parts (``{"type": "text", ...}``)."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Optional[Union[str, list[dict[str, Any]]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None
    # An earlier assistant turn's thinking, under either name (templates read ``reasoning_content``).
    reasoning_content: Optional[str] = None
    reasoning: Optional[str] = None


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    # Structured output and tool calling: checked (with errors naming the field) in guided.py and tools.py.
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    # OpenAI's reasoning models' knob, mapped to the chat template's thinking switch (reasoning.py).
    reasoning_effort: Optional[str] = None
    # Chat-template controls, as vLLM names them.
    chat_template_kwargs: Optional[dict[str, Any]] = None
    add_generation_prompt: Optional[bool] = None
    continue_final_message: Optional[bool] = None


class ChatResponseMessage(BaseModel):
    """``reasoning_content`` (DeepSeek's, llama.cpp's, the openai-agents SDK's and LiteLLM's field) and
    ``reasoning`` (vLLM's and OpenRouter's) carry the same thinking, present only when a reasoning parser ran."""

    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    refusal: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = Field(**_OMIT)
    reasoning_content: Optional[str] = Field(**_OMIT)
    reasoning: Optional[str] = Field(**_OMIT)


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: Optional[list[ChatTokenLogprob]] = None
    refusal: Optional[list[ChatTokenLogprob]] = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatChoiceLogprobs] = None
    finish_reason: Optional[Literal["stop", "length", "tool_calls", "content_filter"]] = None


def _now() -> int:
    return int(time.time())


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: Optional[str] = None


class ChatDelta(BaseModel):
    """What a chunk adds to a choice. ``role`` appears in the first delta of a choice only."""

    role: Optional[Literal["assistant"]] = Field(**_OMIT)
    content: Optional[str] = Field(**_OMIT)
    tool_calls: Optional[list[dict[str, Any]]] = Field(**_OMIT)
    reasoning_content: Optional[str] = Field(**_OMIT)  # both names, as on ChatResponseMessage
    reasoning: Optional[str] = Field(**_OMIT)


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: Optional[ChatChoiceLogprobs] = None
    finish_reason: Optional[Literal["stop", "length", "tool_calls", "content_filter"]] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    system_fingerprint: Optional[str] = None
    usage: Optional[UsageInfo] = Field(**_OMIT)


# ----------------------------------------------------------------------------------------------
# OpenAI: (legacy) completions
# ----------------------------------------------------------------------------------------------

class CompletionRequest(_SamplingFields):
    """POST /v1/completions. ``prompt``: a string, strings, token ids or lists of token ids."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(default=16, ge=1)
    echo: bool = False
    logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    best_of: Optional[int] = Field(default=None, ge=1, le=128)
    suffix: Optional[str] = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[Literal["stop", "length", "content_filter"]] = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = Field(**_OMIT)
    system_fingerprint: Optional[str] = None


# ----------------------------------------------------------------------------------------------
# OpenAI: models and errors
# ----------------------------------------------------------------------------------------------

class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "tgi_nb"
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ----------------------------------------------------------------------------------------------
# OpenAI: embeddings
# ----------------------------------------------------------------------------------------------

class EmbeddingRequest(_Request):
    """POST /v1/embeddings. ``input`` is a string, a list of strings, a list of token ids or a list of
    token-id lists (ids of the embedding model's tokenizer, special tokens included); it is checked in
    embeddings.py, with errors naming ``input[i]``."""

    input: Any = Field(json_schema_extra={"anyOf": [
        {"type": "string"}, {"type": "array", "items": {"type": "string"}},
        {"type": "array", "items": {"type": "integer"}},
        {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}}]})
    model: Optional[str] = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    user: Optional[str] = None
    # vLLM's extension: cut inputs longer than the model reads to their last N tokens instead of a 400;
    # -1 means the model's maximum.
    truncate_prompt_tokens: Optional[int] = Field(default=None, ge=-1)


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class OpenAIError(BaseModel):
    """``{"error": {"message", "type", "param", "code"}}``, OpenAI's error object."""

    error: OpenAIErrorBody


# ----------------------------------------------------------------------------------------------
# TGI routes
# ----------------------------------------------------------------------------------------------

class GenerateParameters(_Request):
    """``parameters`` of TGI's /generate and /generate_stream."""

    best_of: Optional[int] = Field(default=None, ge=1)
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    grammar: Optional[dict[str, Any]] = None
    max_new_tokens: Optional[int] = Field(default=None, ge=1)
    repetition_penalty: Optional[float] = Field(default=None, gt=0)
    return_full_text: Optional[bool] = None
    seed: Optional[int] = Field(default=None, ge=0)
    stop: list[str] = Field(default_factory=list)
    temperature: Optional[float] = Field(default=None, gt=0)
    top_k: Optional[int] = Field(default=None, gt=0)
    top_n_tokens: Optional[int] = Field(default=None, ge=0)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    truncate: Optional[int] = Field(default=None, ge=1)
    typical_p: Optional[float] = Field(default=None, gt=0, le=1)
    watermark: bool = False
    adapter_id: Optional[str] = None


class GenerateRequest(_Request):
    """POST /generate, /generate_stream and / (``stream`` picks which)."""

    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False


class TGIToken(BaseModel):
    id: int
    text: str
    logprob: Optional[float] = None
    special: bool = False


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: Optional[float] = None


TGIFinishReason = Literal["length", "eos_token", "stop_sequence"]


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: TGIFinishReason
    generated_tokens: int
    seed: Optional[int] = None
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[TGIToken] = Field(default_factory=list)
    top_tokens: Optional[list[list[TGIToken]]] = Field(**_OMIT)


class GenerateDetails(BaseModel):
    finish_reason: TGIFinishReason
    generated_tokens: int
    seed: Optional[int] = None
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[TGIToken] = Field(default_factory=list)
    top_tokens: Optional[list[list[TGIToken]]] = Field(**_OMIT)
    best_of_sequences: Optional[list[BestOfSequence]] = Field(**_OMIT)


class GenerateResponse(BaseModel):
    generated_text: str
    details: Optional[GenerateDetails] = Field(**_OMIT)


class StreamDetails(BaseModel):
    finish_reason: TGIFinishReason
    generated_tokens: int
    seed: Optional[int] = None
    input_length: int


class StreamResponse(BaseModel):
    index: int
    token: TGIToken
    top_tokens: Optional[list[TGIToken]] = Field(**_OMIT)
    generated_text: Optional[str] = None
    details: Optional[StreamDetails] = None


class TGIError(BaseModel):
    """``{"error": "...", "error_type": "..."}``, TGI's error object."""

    error: str
    error_type: str


class Info(BaseModel):
    """GET /info: TGI's fields first, then what this server adds."""

    model_id: str
    model_sha: Optional[str] = None
    model_pipeline_tag: Optional[str] = "text-generation"
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: Optional[int] = None
    max_total_tokens: Optional[int] = None
    validation_workers: int = 1
    max_client_batch_size: int = 4
    router: str = "tgi_nb"
    version: str
    sha: Optional[str] = None
    docker_label: Optional[str] = None
    served_model_name: str
    model_status: str
    max_top_n_tokens: int
    max_batch_total_tokens: Optional[int] = None
    # tgi_nb's own: what the weights and the KV cache take, and why the limits are what they are
    weights_bytes: Optional[int] = None
    kv_cache_bytes: Optional[int] = None
    kv_cache_dtype: Optional[str] = None
    num_threads: Optional[int] = None
    capacity_reasons: Optional[list[str]] = None
    # how the weights are held and computed with, e.g. "q8_0 (1), float32 (61), q4_1 (120)" and "exact" | "fast"
    weight_formats: Optional[str] = None
    numerics: Optional[str] = None
    # the model's recommended sampling settings, applied when a request leaves them out (--generation-config)
    generation_config: dict[str, float] = Field(default_factory=dict)
    # each native kernel library used so far: "native", or "torch (<why>)" when it could not be built
    kernels: Optional[dict[str, str]] = None


class TokenizeRequest(_Request):
    """POST /tokenize. TGI sends ``inputs``; vLLM-style clients send ``prompt`` or ``messages``."""

    inputs: Optional[str] = None
    prompt: Optional[Union[str, list[int]]] = None
    messages: Optional[list[ChatMessage]] = Field(default=None, min_length=1)
    add_special_tokens: bool = True  # for ``prompt``, as vLLM: what /v1/completions sees
    add_generation_prompt: bool = True
    chat_template_kwargs: Optional[dict[str, Any]] = None
    model: Optional[str] = None


class SimpleToken(BaseModel):
    id: int
    text: str
    start: int
    stop: int


class VLLMTokenizeResponse(BaseModel):
    count: int
    max_model_len: Optional[int] = None
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeRequest(_Request):
    tokens: list[int]
    model: Optional[str] = None


class DetokenizeResponse(BaseModel):
    prompt: str


class ChatTokenizeResponse(BaseModel):
    tokenize_response: list[SimpleToken]
    templated_text: str
