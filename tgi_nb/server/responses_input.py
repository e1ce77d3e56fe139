"""A Responses request as the chat request the one generation path runs (generation.py), and what cannot be
honoured refused with a 400 naming it.

- ``input``: a string (one user message), or items: messages (``role`` user / system / developer /
  assistant, content a string or ``input_text`` / ``output_text`` parts), ``function_call`` and
  ``function_call_output`` items (an assistant tool call and its result), ``reasoning`` items (the thinking
  of the assistant turn that follows, given to templates as ``reasoning_content``).
- ``instructions``: a system message first (not carried to the next turn, as OpenAI does).
- ``tools``: function tools (``{"type": "function", "name", "description", "parameters", "strict"}``);
  OpenAI's built-in tools (web_search, file_search, code_interpreter, ...) are refused by name.
- ``tool_choice``: ``auto`` / ``none`` / ``required`` / ``{"type": "function", "name": ...}``.
- ``text.format``: ``text``, ``json_object``, ``json_schema`` (``name``, ``schema``, ``strict``).
- ``reasoning.effort``: mapped to the chat template's thinking switch (reasoning.py).

Example:
    >>> chat_tools([{"type": "function", "name": "f", "parameters": {"type": "object"}}])[0]["function"]["name"]
    'f'
    >>> chat_tools([{"type": "web_search"}])
    Traceback (most recent call last):
    ...
    tgi_nb.server.errors.BadRequest: tools.0.type: 'web_search' is one of OpenAI's built-in tools, which this server does not run; only 'function' tools are supported
"""

from __future__ import annotations

import re
import uuid
from typing import Any, Optional

from .chat import parts_text
from .errors import BadRequest
from .protocol import ChatCompletionRequest
from .responses_protocol import FunctionCallItem, OutputItem, OutputMessage, ReasoningItem, ResponsesRequest

# Include values that ask for nothing this server lacks (there is no encrypted reasoning: it is plain text).
_INCLUDES = ("reasoning.encrypted_content",)
_ROLES = ("user", "system", "developer", "assistant")


def item_id(prefix: str) -> str:
    """A new item id in OpenAI's shape (``msg_…``, ``fc_…``, ``rs_…``, ``resp_…``).

    Example:
        >>> item_id("msg").startswith("msg_")
        True
    """
    return f"{prefix}_{uuid.uuid4().hex}"


def reject_unsupported(req: ResponsesRequest) -> None:
    """400 for what this server does not do, naming the field."""
    if req.background:
        raise BadRequest("background: background responses are not supported; send the request without it (or "
                         "stream it)", param="background")
    for name in ("conversation", "prompt", "top_logprobs", "max_tool_calls"):
        if getattr(req, name) is not None:
            raise BadRequest(f"{name}: not supported by this server", param=name)
    if req.truncation not in (None, "disabled"):
        raise BadRequest(f"truncation: only 'disabled' is supported (an input longer than the context is a 400), "
                         f"got {req.truncation!r}", param="truncation")
    for i, value in enumerate(req.include or []):
        if value not in _INCLUDES:
            allowed = ", ".join(repr(v) for v in _INCLUDES)
            raise BadRequest(f"include.{i}: {value!r} is not supported; allowed: {allowed}", param=f"include.{i}")


# ----------------------------------------------------------------------------------------------
# input -> chat messages
# ----------------------------------------------------------------------------------------------

def _parts_text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{param}: must be a string or a list of input_text parts", param=param)
    return parts_text(content, param)


def input_messages(value: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``input`` as (items as /input_items lists them, with ids; chat messages for the template).

    Example:
        >>> items, messages = input_messages("Hi")
        >>> items[0]["content"], messages
        ([{'type': 'input_text', 'text': 'Hi'}], [{'role': 'user', 'content': 'Hi'}])
    """
    if isinstance(value, str):
        value = [{"type": "message", "role": "user", "content": value}]
    items: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = []
    reasoning: Optional[str] = None
    for i, item in enumerate(value):
        param = f"input.{i}"
        if not isinstance(item, dict):
            raise BadRequest(f"{param}: must be an object (a message or an item)", param=param)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise BadRequest(f"{param}.role: must be one of {', '.join(map(repr, _ROLES))}, got {role!r}",
                                 param=f"{param}.role")
            text = _parts_text(item.get("content", ""), f"{param}.content")
            part = "output_text" if role == "assistant" else "input_text"
            items.append({"id": item.get("id") or item_id("msg"), "type": "message", "role": role,
                          "status": "completed", "content": [{"type": part, "text": text}]})
            message: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": text}
            if role == "assistant" and reasoning is not None:
                message["reasoning_content"], reasoning = reasoning, None
            messages.append(message)
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str):
                    raise BadRequest(f"{param}.{key}: must be a string", param=f"{param}.{key}")
            items.append({"id": item.get("id") or item_id("fc"), "type": "function_call", "status": "completed",
                          **{k: item[k] for k in ("call_id", "name", "arguments")}})
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
                if reasoning is not None:
                    messages[-1]["reasoning_content"], reasoning = reasoning, None
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise BadRequest(f"{param}.call_id: must be a string", param=f"{param}.call_id")
            output = _parts_text(item.get("output", ""), f"{param}.output")
            items.append({"id": item.get("id") or item_id("fco"), "type": "function_call_output",
                          "status": "completed", "call_id": item["call_id"], "output": output})
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        elif kind == "reasoning":
            parts = (item.get("content") or []) + (item.get("summary") or [])
            reasoning = "\n".join(str(p.get("text", "")) for p in parts if isinstance(p, dict)) or None
            items.append({"id": item.get("id") or item_id("rs"), "type": "reasoning", "summary": [],
                          "content": [{"type": "reasoning_text", "text": reasoning or ""}]})
        else:
            raise BadRequest(f"{param}.type: must be 'message', 'function_call', 'function_call_output' or "
                             f"'reasoning', got {kind!r}", param=f"{param}.type")
    return items, messages


def output_message(output: list[OutputItem]) -> Optional[dict[str, Any]]:
    """A response's output as the assistant turn the next request continues from (None if empty).

    Example:
        >>> from tgi_nb.server.responses_protocol import OutputText
        >>> output_message([OutputMessage(id="msg_1", content=[OutputText(text="Hi")])])
        {'role': 'assistant', 'content': 'Hi'}
    """
    text, calls, reasoning = [], [], []
    for item in output:
        if isinstance(item, OutputMessage):
            text.extend(part.text for part in item.content)
        elif isinstance(item, FunctionCallItem):
            calls.append({"id": item.call_id, "type": "function",
                          "function": {"name": item.name, "arguments": item.arguments}})
        elif isinstance(item, ReasoningItem):
            reasoning.extend(part.text for part in item.content)
    if not (text or calls or reasoning):
        return None
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
    if calls:
        message["tool_calls"] = calls
    if reasoning:
        message["reasoning_content"] = "\n".join(reasoning)
    return message


# ----------------------------------------------------------------------------------------------
# tools, tool_choice, text.format -> chat's
# ----------------------------------------------------------------------------------------------

def chat_tools(tools: Optional[list[Any]]) -> Optional[list[dict[str, Any]]]:
    """Responses' flat function tools as chat's ``{"type": "function", "function": {...}}``."""
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            if isinstance(kind, str):
                raise BadRequest(f"tools.{i}.type: {kind!r} is one of OpenAI's built-in tools, which this server "
                                 f"does not run; only 'function' tools are supported", param=f"tools.{i}.type")
            raise BadRequest(f"tools.{i}: must be {{\"type\": \"function\", \"name\": ..., \"parameters\": ...}}",
                             param=f"tools.{i}")
        function = {k: v for k, v in tool.items() if k != "type"}
        out.append({"type": "function", "function": function})
    return out


def chat_tool_choice(choice: Any) -> Any:
    """``{"type": "function", "name": ...}`` as chat's ``{"type": "function", "function": {"name": ...}}``."""
    if not isinstance(choice, dict):
        return choice
    kind = choice.get("type")
    if kind != "function":
        raise BadRequest(f"tool_choice.type: only 'function' (or 'auto', 'none', 'required') is supported, got "
                         f"{kind!r}", param="tool_choice.type")
    return {"type": "function", "function": {"name": choice.get("name")}}


def chat_response_format(text: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """``text.format`` as chat's ``response_format`` (guided.py checks it)."""
    fmt = (text or {}).get("format")
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return fmt
    return {"type": "json_schema",
            "json_schema": {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}}


def chat_request(req: ResponsesRequest, messages: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The chat request the one generation path runs for ``req`` (``messages``: the whole conversation)."""
    if not messages:
        raise BadRequest("input: must not be empty", param="input")
    effort = (req.reasoning or {}).get("effort")
    system = [{"role": "system", "content": req.instructions}] if req.instructions else []
    return ChatCompletionRequest(
        model=req.model, messages=system + messages, tools=chat_tools(req.tools),
        tool_choice=chat_tool_choice(req.tool_choice), parallel_tool_calls=req.parallel_tool_calls,
        response_format=chat_response_format(req.text), max_completion_tokens=req.max_output_tokens,
        temperature=req.temperature, top_p=req.top_p, reasoning_effort=effort, seed=req.seed, top_k=req.top_k,
        min_p=req.min_p, repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, chat_template_kwargs=req.chat_template_kwargs, user=req.user)


# Chat field names in errors -> the Responses field the client sent.
_RENAMES = ((re.compile(r"\bresponse_format\.json_schema\.schema\b"), "text.format.schema"),
            (re.compile(r"\bresponse_format\.json_schema\b"), "text.format"),
            (re.compile(r"\bresponse_format\b"), "text.format"),
            (re.compile(r"\bmax_completion_tokens\b"), "max_output_tokens"),
            (re.compile(r"\bmessages\b"), "input"),
            (re.compile(r"\btools\.(\d+)\.function\."), r"tools.\1."),
            (re.compile(r"\btool_choice\.function\.name\b"), "tool_choice.name"))


def rename_error(err: BadRequest) -> BadRequest:
    """``err`` with chat's field names replaced by the Responses fields they came from.

    Example:
        >>> rename_error(BadRequest("max_completion_tokens: too large", param="max_completion_tokens")).param
        'max_output_tokens'
    """
    for pattern, repl in _RENAMES:
        err.message = pattern.sub(repl, err.message)
        if err.param:
            err.param = pattern.sub(repl, err.param)
    err.args = (err.message,)
    return err


def stored_text_config(req: ResponsesRequest) -> dict[str, Any]:
    """The ``text`` a response echoes: the request's, with ``format`` defaulting to text."""
    return {"format": {"type": "text"}, **(req.text or {})}
