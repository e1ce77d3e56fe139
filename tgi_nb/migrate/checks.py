"""What one answer says, whatever the route: its text, finish reason, tokens, whether its JSON, schema and tool
calls are valid, which requested parameters it shows were ignored, and whether it matches a reference exactly.

Every function takes the route (``/v1/chat/completions``...), the request body sent and the response body got.
"""

from __future__ import annotations

import json
from typing import Any, Optional

CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                                            "/v1/responses")


def _first_choice(response: Any) -> dict[str, Any]:
    choices = response.get("choices") if isinstance(response, dict) else None
    return choices[0] if choices and isinstance(choices[0], dict) else {}


def tool_calls(endpoint: str, response: Any) -> list[dict[str, Any]]:
    """The answer's tool calls as ``{"name", "arguments"}`` (arguments as the JSON text the model wrote)."""
    if endpoint == CHAT:
        calls = (_first_choice(response).get("message") or {}).get("tool_calls") or []
        return [{"name": (c.get("function") or {}).get("name"), "arguments": (c.get("function") or {}).get("arguments")}
                for c in calls if isinstance(c, dict)]
    if endpoint == RESPONSES and isinstance(response, dict):
        return [{"name": o.get("name"), "arguments": o.get("arguments")} for o in response.get("output") or []
                if isinstance(o, dict) and o.get("type") == "function_call"]
    return []


def answer_text(endpoint: str, response: Any) -> Optional[str]:
    """The text of the answer (its tool calls as JSON when it has no text); None for embeddings.

    Example:
        >>> answer_text(CHAT, {"choices": [{"message": {"content": "Paris"}}]})
        'Paris'
        >>> answer_text(COMPLETIONS, {"choices": [{"text": " upon a time"}]})
        ' upon a time'
    """
    if endpoint == CHAT:
        content = (_first_choice(response).get("message") or {}).get("content")
    elif endpoint == COMPLETIONS:
        content = _first_choice(response).get("text")
    elif endpoint == RESPONSES and isinstance(response, dict):
        content = "".join(part.get("text") or "" for item in response.get("output") or [] if isinstance(item, dict)
                          and item.get("type") == "message" for part in item.get("content") or []
                          if isinstance(part, dict) and part.get("type") == "output_text") or None
    else:
        return None
    if content:
        return content
    calls = tool_calls(endpoint, response)
    return json.dumps(calls) if calls else content


def finish_reason(endpoint: str, response: Any) -> Optional[str]:
    """``stop``, ``length``, ``tool_calls``, ``content_filter`` (the Responses API's status mapped onto them).

    Example:
        >>> finish_reason(RESPONSES, {"status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}})
        'length'
    """
    if endpoint in (CHAT, COMPLETIONS):
        return _first_choice(response).get("finish_reason")
    if endpoint == RESPONSES and isinstance(response, dict):
        if response.get("status") == "incomplete":
            reason = (response.get("incomplete_details") or {}).get("reason")
            return "length" if reason == "max_output_tokens" else reason
        return "tool_calls" if tool_calls(endpoint, response) else "stop"
    return None


def token_counts(response: Any) -> tuple[Optional[int], Optional[int]]:
    """(prompt tokens, completion tokens) from ``usage``, in either API's names."""
    usage = response.get("usage") if isinstance(response, dict) else None
    if not isinstance(usage, dict):
        return None, None
    return usage.get("prompt_tokens", usage.get("input_tokens")), usage.get("completion_tokens",
                                                                             usage.get("output_tokens"))


def _requested_format(endpoint: str, body: dict[str, Any]) -> Optional[dict[str, Any]]:
    fmt = body.get("response_format") if endpoint != RESPONSES else (body.get("text") or {}).get("format")
    return fmt if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema") else None


def _schema_of(fmt: dict[str, Any]) -> Optional[dict[str, Any]]:
    schema = (fmt.get("json_schema") or {}).get("schema") if "json_schema" in fmt else fmt.get("schema")
    return schema if isinstance(schema, dict) else None


def _validates(instance: Any, schema: Optional[dict[str, Any]]) -> Optional[bool]:
    if schema is None:
        return True
    try:
        import jsonschema
    except ImportError:  # an optional check: without jsonschema, schema validity is not reported
        return None
    try:
        jsonschema.validate(instance, schema)
    except jsonschema.ValidationError:
        return False
    except jsonschema.SchemaError:
        return None
    return True


def json_validity(endpoint: str, body: dict[str, Any], response: Any) -> tuple[Optional[bool], Optional[bool]]:
    """(is the answer JSON, does it match the schema) when the request asked for JSON; (None, None) otherwise.

    Example:
        >>> body = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        ...     "type": "object", "required": ["city"]}}}}
        >>> json_validity(CHAT, body, {"choices": [{"message": {"content": '{"city": "Paris"}'}}]})
        (True, True)
        >>> json_validity(CHAT, body, {"choices": [{"message": {"content": 'Paris'}}]})
        (False, False)
    """
    fmt = _requested_format(endpoint, body)
    if fmt is None:
        return None, None
    try:
        value = json.loads(answer_text(endpoint, response) or "")
    except ValueError:
        return False, False
    return True, _validates(value, _schema_of(fmt)) if fmt["type"] == "json_schema" else None


def _declared_tools(endpoint: str, body: dict[str, Any]) -> dict[str, Optional[dict[str, Any]]]:
    tools = {}
    for tool in body.get("tools") or []:
        if not isinstance(tool, dict):
            continue
        function = tool.get("function") if endpoint == CHAT else tool
        if isinstance(function, dict) and function.get("name"):
            tools[function["name"]] = function.get("parameters")
    return tools


def tool_call_validity(endpoint: str, body: dict[str, Any], response: Any) -> Optional[bool]:
    """Whether every tool call names a declared tool with arguments that are a JSON object matching its
    parameters, and a call was made when ``tool_choice`` required one; None when the request had no tools or
    none was required and none was made."""
    declared = _declared_tools(endpoint, body)
    if not declared:
        return None
    calls = tool_calls(endpoint, response)
    choice = body.get("tool_choice")
    if not calls:
        return False if choice == "required" or isinstance(choice, dict) else None
    for call in calls:
        if call["name"] not in declared:
            return False
        try:
            arguments = json.loads(call["arguments"] or "")
        except (TypeError, ValueError):
            return False
        if not isinstance(arguments, dict) or _validates(arguments, declared[call["name"]]) is False:
            return False
    return True


def ignored_parameters(endpoint: str, body: dict[str, Any], response: Any) -> list[str]:
    """Requested parameters the answer shows were not honoured: ``n`` (fewer choices), ``logprobs`` (none
    returned), ``max_tokens`` (more tokens than allowed), ``stop`` (a stop string in the text).

    Example:
        >>> ignored_parameters(CHAT, {"n": 2, "stop": ["."], "max_tokens": 3},
        ...                    {"choices": [{"message": {"content": "A. B"}}], "usage": {"completion_tokens": 5}})
        ['n', 'max_tokens', 'stop']
    """
    if endpoint not in (CHAT, COMPLETIONS) or not isinstance(response, dict):
        return []
    ignored = []
    choices = response.get("choices") or []
    if isinstance(body.get("n"), int) and len(choices) < body["n"]:
        ignored.append("n")
    wants_logprobs = body.get("logprobs") is True if endpoint == CHAT else isinstance(body.get("logprobs"), int)
    if wants_logprobs and not any(isinstance(c, dict) and c.get("logprobs") for c in choices):
        ignored.append("logprobs")
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    completion = token_counts(response)[1]
    if isinstance(limit, int) and isinstance(completion, int) and completion > limit * max(1, len(choices)):
        ignored.append("max_completion_tokens" if body.get("max_completion_tokens") else "max_tokens")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else [s for s in stop or [] if isinstance(s, str)]
    text = answer_text(endpoint, response) or ""
    if any(s and s in text for s in stops):
        ignored.append("stop")
    return ignored


def deterministic(body: dict[str, Any]) -> bool:
    """Whether the request asks for one possible answer (greedy: ``temperature`` 0 or ``top_p`` 0)."""
    return body.get("temperature") == 0 or body.get("top_p") == 0
