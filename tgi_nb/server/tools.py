"""Tool calling: what the model is told about the tools and the grammar that forces a call; the parser
that turns the model's text into OpenAI ``tool_calls`` is in tool_parser.py.

One text format throughout, Hermes' (Qwen 2.5/3, Hermes, SmolLM3 and many fine-tunes were trained on it)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

- ``tool_choice="none"``: the tools are left out of the prompt; the output is plain content.
- ``"auto"`` (the default with tools): the model chooses; ``tool_parser.ToolCallParser`` finds ``<tool_call>``
  blocks (or an output that is just a JSON call, as Llama 3.1 and Mistral write them) and streams them
  as tool-call deltas; anything else is content.
- ``"required"`` or ``{"type": "function", "function": {"name": ...}}``: a grammar forces one or more
  blocks (exactly one of the named function), each a JSON object whose name is an allowed tool and whose
  arguments match that tool's ``parameters`` schema, so even a weak model produces a valid call.

Tool calls end: a call identical to an earlier one (same name, same arguments) is never useful, yet a weak
model at ``temperature=0`` repeats its call until ``max_tokens``. ``tool_parser.ToolCallGuard`` ends the output
once a repeated call closes and the parser drops the repeat; with ``parallel_tool_calls=false`` the output
ends after the first call and only that call is returned (OpenAI's meaning; vLLM likewise keeps the first).

A chat template that knows tools (it mentions ``tools`` and ``tool_calls``) gets them as ``tools=`` and the
messages as they are; for any other template the tools are described in the system message, assistant
tool calls are written out as ``<tool_call>`` blocks and tool results as ``<tool_response>`` user turns.

Example:
    >>> plan = plan_tools([{"type": "function", "function": {"name": "get_weather"}}], "auto", None)
    >>> plan.mode, plan.names
    ('auto', ['get_weather'])
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from tgi_nb.engine.guided_decoding import lark_grammar, with_json_style

from .errors import BadRequest
from .guided import GuideSpec
from .tool_parser import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ToolCallGuard

TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"

_CHOICES = ("none", "auto", "required")
_CHOICE_SHAPE = "'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}"


# ----------------------------------------------------------------------------------------------
# The request: which tools, which choice
# ----------------------------------------------------------------------------------------------

@dataclass(slots=True)
class ToolPlan:
    """What a chat request asked of tools. ``mode``: ``none``, ``auto``, ``required`` or ``named``
    (``named`` is the function the model must call); ``tools`` are OpenAI tool objects."""

    mode: str = "none"
    tools: list[dict[str, Any]] = field(default_factory=list)
    named: Optional[str] = None
    parallel: bool = True

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    @property
    def forced(self) -> bool:
        """True when the output must be tool calls (a grammar makes sure of it)."""
        return self.mode in ("required", "named")

    @property
    def template_tools(self) -> Optional[list[dict[str, Any]]]:
        """The tools the prompt shows the model (none for ``tool_choice="none"``)."""
        return self.tools if self.mode != "none" and self.tools else None

    def instructions(self) -> Optional[str]:
        """The system text describing the tools, for chat templates that do not render them.

        Example:
            >>> text = ToolPlan("named", [{"type": "function", "function": {"name": "f"}}], "f").instructions()
            >>> text.splitlines()[-1]
            'You must call the function "f".'
        """
        if self.template_tools is None:
            return None
        listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in self.tools)
        text = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n"
                f"<tools>\n{listed}\n</tools>\n\n"
                "For each function call, return a json object with function name and arguments within "
                "<tool_call></tool_call> XML tags:\n"
                f'{TOOL_CALL_OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{TOOL_CALL_CLOSE}')
        if self.mode == "required":
            text += "\n\nYou must call at least one function."
        elif self.mode == "named":
            text += f'\n\nYou must call the function "{self.named}".'
        return text

    def guide(self) -> Optional[GuideSpec]:
        """The grammar forcing tool calls (``required``: one or more, one only without
        ``parallel_tool_calls``; ``named``: exactly one call of that function), else None."""
        if not self.forced:
            return None
        indices = [i for i, t in enumerate(self.tools)
                   if self.mode == "required" or t["function"]["name"] == self.named]
        schemas = {i: _call_schema(self.tools[i]["function"]) for i in indices}
        rules = [f"call_{i}: %json{json.dumps(schemas[i])}" for i in indices]
        block = f'"{TOOL_CALL_OPEN}\\n" call "\\n{TOOL_CALL_CLOSE}"'
        repeat = ' ("\\n" block)*' if self.mode == "required" and self.parallel else ""
        lark = "\n".join([f"start: block{repeat}", f"block: {block}",
                          "call: " + " | ".join(f"call_{i}" for i in indices), *rules])
        parts = tuple((f"tools.{i}.function.parameters", lark_grammar(f"start: %json{json.dumps(schemas[i])}"))
                      for i in indices)
        return GuideSpec(lark_grammar(lark), "tools", "tool parameters schema", parts)

    def processor_factory(self, grammar_factory: Optional[Callable[[], Any]], tokenizer: Any,
                          eos_token_ids: Iterable[int], answer: Optional[Callable[[str], str]] = None
                          ) -> Callable[[], ToolCallGuard]:
        """The per-sample logits processors of a request whose output is parsed for tool calls: the
        forced-call grammar's (``grammar_factory``, None without one) inside a :class:`ToolCallGuard`;
        ``answer`` cuts a whole output to its answer (calls written while thinking do not count).

        Example:
            >>> plan = plan_tools([{"type": "function", "function": {"name": "f"}}], "auto", False)
            >>> factory = plan.processor_factory(None, tokenizer, [2])              # doctest: +SKIP
            >>> SamplingParams(logits_processor_factory=factory)                   # doctest: +SKIP
        """
        eos = sorted(set(eos_token_ids))
        return lambda: ToolCallGuard(grammar_factory() if grammar_factory is not None else None, tokenizer,
                                     eos, single=not self.parallel, answer=answer)


class NoTagEcho:
    """A logits processor for an answer that follows tool results written as ``<tool_response>`` turns (a
    template that knows no tools): the first token may not open a tag. A small model otherwise copies the
    turn it just read, tags and all ("<tool_response>\nIt is sunny..."), where it then answers in words
    ("The weather in Paris is sunny and 24 degrees."). Only for requests whose output is neither tool calls
    nor thinking, which open with a tag of their own.

    Example:
        >>> no_echo = NoTagEcho(tokenizer)                                                    # doctest: +SKIP
        >>> torch.isinf(no_echo([], torch.zeros(49152)))[tokenizer.encode("<")[0]].item()    # doctest: +SKIP
        True
    """

    __slots__ = ("_first",)

    def __init__(self, tokenizer: Any):
        self._first = tokenizer.encode(TOOL_RESPONSE_OPEN, add_special_tokens=False)[0]

    def __call__(self, generated: list[int], logits: Any) -> Any:
        if not generated:
            logits[self._first] = float("-inf")
        return logits


def follows_tool_results_as_text(messages: Iterable[Any], template: str) -> bool:
    """True when ``messages`` hold tool results that a template without tools gets as ``<tool_response>`` turns.

    Example:
        >>> from types import SimpleNamespace
        >>> follows_tool_results_as_text([SimpleNamespace(role="tool")], "{{ messages }}")
        True
    """
    from .chat import template_supports_tools  # chat.py imports this module

    return any(getattr(m, "role", None) == "tool" for m in messages) and not template_supports_tools(template)


def _rebase_refs(schema: Any, base: str) -> Any:
    """``schema`` with its local ``$ref``s (``#/$defs/X``, ``#``) pointing into ``base``, where it now sits."""
    if isinstance(schema, dict):
        out = {}
        for key, value in schema.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#"):
                out[key] = "#" + base + value[1:]
            else:
                out[key] = _rebase_refs(value, base)
        return out
    if isinstance(schema, list):
        return [_rebase_refs(v, base) for v in schema]
    return schema


def _call_schema(function: dict[str, Any]) -> dict[str, Any]:
    # OpenAI: leaving out "parameters" defines a function without parameters.
    parameters = function.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}, "additionalProperties": False}
    # name before arguments, as in the instructions, so the parser can stream the arguments.
    return with_json_style({
        "type": "object",
        "properties": {"name": {"const": function["name"]},
                       "arguments": _rebase_refs(parameters, "/properties/arguments")},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    })


def _check_tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise BadRequest("tools: must be a list of {\"type\": \"function\", \"function\": {...}}", param="tools")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise BadRequest(f"tools.{i}: must be an object {{\"type\": \"function\", \"function\": {{...}}}}",
                             param=f"tools.{i}")
        kind = tool.get("type", "function")
        if kind != "function":
            raise BadRequest(f"tools.{i}.type: only 'function' tools are supported, got {kind!r}",
                             param=f"tools.{i}.type")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise BadRequest(f"tools.{i}.function: must be an object with a 'name'", param=f"tools.{i}.function")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest(f"tools.{i}.function.name: must be a non-empty string", param=f"tools.{i}.function.name")
        if name in seen:
            raise BadRequest(f"tools.{i}.function.name: {name!r} is defined twice", param=f"tools.{i}.function.name")
        seen.add(name)
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise BadRequest(f"tools.{i}.function.parameters: must be a JSON schema object",
                             param=f"tools.{i}.function.parameters")
        out.append({**tool, "type": "function"})
    return out


def plan_tools(tools: Optional[list[Any]], tool_choice: Any, parallel_tool_calls: Optional[bool]) -> ToolPlan:
    """Check ``tools`` and ``tool_choice`` (raising :class:`BadRequest` naming the field) and return the plan.

    Example:
        >>> plan_tools(None, None, None).mode
        'none'
        >>> plan_tools([{"type": "function", "function": {"name": "f"}}], "f", None)
        Traceback (most recent call last):
        ...
        tgi_nb.server.errors.BadRequest: tool_choice: must be 'none', 'auto', 'required' or {"type": "function", "function": {"name": ...}}, got 'f'
    """
    checked = _check_tools(tools) if tools else []
    names = [t["function"]["name"] for t in checked]
    parallel = parallel_tool_calls is not False
    if tool_choice is None:
        return ToolPlan("auto" if checked else "none", checked, parallel=parallel)
    if isinstance(tool_choice, str):
        if tool_choice not in _CHOICES:
            raise BadRequest(f"tool_choice: must be {_CHOICE_SHAPE}, got {tool_choice!r}", param="tool_choice")
        if tool_choice == "required" and not checked:
            raise BadRequest("tool_choice: 'required' needs tools", param="tool_choice")
        return ToolPlan(tool_choice if checked else "none", checked, parallel=parallel)
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(function, dict) or tool_choice.get("type", "function") != "function":
        raise BadRequest(f"tool_choice: must be {_CHOICE_SHAPE}, got {json.dumps(tool_choice)[:200]}",
                         param="tool_choice")
    name = function.get("name")
    if name not in names:
        allowed = ", ".join(repr(n) for n in names) or "none (no tools were given)"
        raise BadRequest(f"tool_choice.function.name: {name!r} is not one of the tools; allowed: {allowed}",
                         param="tool_choice.function.name")
    return ToolPlan("named", checked, name, parallel=False)


# ----------------------------------------------------------------------------------------------
# Conversations with tool calls, for templates that do not know tools
# ----------------------------------------------------------------------------------------------

def tool_call_text(name: str, arguments: Any) -> str:
    """One call as the model writes it.

    Example:
        >>> print(tool_call_text("f", {"x": 1}))
        <tool_call>
        {"name": "f", "arguments": {"x": 1}}
        </tool_call>
    """
    call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{call}\n{TOOL_CALL_CLOSE}"


def tool_messages_as_text(messages: list[dict[str, Any]], instructions: Optional[str] = None
                          ) -> list[dict[str, Any]]:
    """Template messages with tool calls written into assistant content, tool results as user turns
    (consecutive ones merged, so templates that want user/assistant alternation still render) and
    ``instructions`` added to the system message.

    Example:
        >>> tool_messages_as_text([{"role": "tool", "content": "21C", "tool_call_id": "call_1"}])
        [{'role': 'user', 'content': '<tool_response>\\n21C\\n</tool_response>'}]
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message["role"]
        if role == "tool":
            text = f"{TOOL_RESPONSE_OPEN}\n{message.get('content') or ''}\n{TOOL_RESPONSE_CLOSE}"
            if out and out[-1].get("_tool_responses"):
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "_tool_responses": True})
            continue
        if role == "assistant" and message.get("tool_calls"):
            calls = [tool_call_text((c.get("function") or {}).get("name", ""),
                                    (c.get("function") or {}).get("arguments", {}))
                     for c in message["tool_calls"]]
            message = {k: v for k, v in message.items() if k != "tool_calls"}
            message["content"] = "\n".join(([message["content"]] if message.get("content") else []) + calls)
        out.append(message)
    for message in out:
        message.pop("_tool_responses", None)
    if instructions:
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{instructions}" if out[0]["content"]
                      else instructions}
        else:
            out.insert(0, {"role": "system", "content": instructions})
    return out
