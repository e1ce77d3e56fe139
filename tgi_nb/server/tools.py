"""Tool calling: what the model is told about the tools, the grammar that forces a call, and the parser
that turns the model's text into OpenAI ``tool_calls``.

One text format throughout, Hermes' (Qwen 2.5/3, Hermes, SmolLM3 and many fine-tunes were trained on it)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

- ``tool_choice="none"``: the tools are left out of the prompt; the output is plain content.
- ``"auto"`` (the default with tools): the model chooses; :class:`ToolCallParser` finds ``<tool_call>``
  blocks (or an output that is just a JSON call, as Llama 3.1 and Mistral write them) and streams them
  as tool-call deltas; anything else is content.
- ``"required"`` or ``{"type": "function", "function": {"name": ...}}``: a grammar forces one or more
  blocks (exactly one of the named function), each a JSON object whose name is an allowed tool and whose
  arguments match that tool's ``parameters`` schema, so even a weak model produces a valid call.

Tool calls end: a call identical to an earlier one (same name, same arguments) is never useful, yet a weak
model at ``temperature=0`` repeats its call until ``max_tokens``. :class:`ToolCallGuard` ends the output
once a repeated call closes and the parser drops the repeat; with ``parallel_tool_calls=false`` the output
ends after the first call and only that call is returned (OpenAI's meaning; vLLM likewise keeps the first).

A chat template that knows tools (it mentions ``tools`` and ``tool_calls``) gets them as ``tools=`` and the
messages as they are; for any other template the tools are described in the system message, assistant
tool calls are written out as ``<tool_call>`` blocks and tool results as ``<tool_response>`` user turns.

Example:
    >>> plan = plan_tools([{"type": "function", "function": {"name": "get_weather"}}], "auto", None)
    >>> plan.mode, plan.names
    ('auto', ['get_weather'])
    >>> content, calls = parse_tool_calls('<tool_call>\\n{"name": "get_weather", "arguments": {}}\\n</tool_call>',
    ...                                   plan.names)
    >>> content, calls[0]["function"]
    (None, {'name': 'get_weather', 'arguments': '{}'})
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch

from tgi_nb.engine.guided_decoding import lark_grammar, with_json_style

from .errors import BadRequest
from .guided import GuideSpec

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"

_CHOICES = ("none", "auto", "required")
_CHOICE_SHAPE = "'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}"


def new_tool_call_id() -> str:
    """An id in OpenAI's shape.

    Example:
        >>> new_tool_call_id().startswith("call_")
        True
    """
    return "call_" + uuid.uuid4().hex[:24]


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
                          eos_token_ids: Iterable[int]) -> Callable[[], "ToolCallGuard"]:
        """The per-sample logits processors of a request whose output is parsed for tool calls: the
        forced-call grammar's (``grammar_factory``, None without one) inside a :class:`ToolCallGuard`.

        Example:
            >>> plan = plan_tools([{"type": "function", "function": {"name": "f"}}], "auto", False)
            >>> factory = plan.processor_factory(None, tokenizer, [2])              # doctest: +SKIP
            >>> SamplingParams(logits_processor_factory=factory)                   # doctest: +SKIP
        """
        eos = sorted(set(eos_token_ids))
        return lambda: ToolCallGuard(grammar_factory() if grammar_factory is not None else None, tokenizer,
                                     eos, single=not self.parallel)


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


# ----------------------------------------------------------------------------------------------
# Ending the output: no repeated call, one call without parallel tool calls
# ----------------------------------------------------------------------------------------------

_BLOCK_TEXT = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)
_CLOSE_TAIL_TOKENS = 16  # enough tokens to spell "</tool_call>" one character per token, and spaces after


def call_key(block: str) -> str:
    """What makes two calls the same: name and arguments, whatever the spacing and key order.

    Example:
        >>> call_key('{"name": "f", "arguments": {"b": 1, "a": 2}}') == \\
        ...     call_key('{"name":"f","arguments":{"a":2,"b":1}}')
        True
    """
    try:
        call = json.loads(block)
    except ValueError:
        return block.strip()
    if not isinstance(call, dict):
        return block.strip()
    arguments = call.get("arguments", call.get("parameters"))
    return json.dumps([call.get("name"), arguments], sort_keys=True, ensure_ascii=False)


class ToolCallGuard:
    """One sample's logits processor for a tool-calling request: once a ``</tool_call>`` closes a call
    identical to an earlier one (or, with ``single``, closes the first call) only the EOS tokens remain
    allowed, so the output ends there. ``inner`` (the forced-call grammar's processor, or None) runs first.

    The check decodes the last few tokens at each step and the whole output only when a block has just
    closed, so it costs little next to a forward pass.

    Example:
        >>> guard = ToolCallGuard(None, tokenizer, [2], single=False)                                  # doctest: +SKIP
        >>> text = '<tool_call>\\n{"name": "f", "arguments": {}}\\n</tool_call>'
        >>> ids = tokenizer.encode(text + "\\n" + text)                                               # doctest: +SKIP
        >>> torch.isfinite(guard(ids, torch.zeros(49152))).nonzero().flatten().tolist()               # doctest: +SKIP
        [2]
    """

    __slots__ = ("_inner", "_tokenizer", "_eos", "_single", "_ended")

    def __init__(self, inner: Optional[Callable[[list[int], torch.Tensor], torch.Tensor]], tokenizer: Any,
                 eos_token_ids: list[int], single: bool):
        self._inner = inner
        self._tokenizer = tokenizer
        self._eos = torch.tensor(eos_token_ids, dtype=torch.long)
        self._single = single
        self._ended = False

    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        if self._inner is not None:
            logits = self._inner(generated, logits)
        eos = self._eos[self._eos < logits.shape[0]]
        # Only where the grammar (if any) lets the output end: a tag inside a JSON string is no end.
        if not self._ended and generated and len(eos) and torch.isfinite(logits[eos]).any():
            self._ended = self._must_end(generated)
        if self._ended:
            kept = logits[eos].clone()
            logits.fill_(float("-inf"))
            logits[eos] = kept
        return logits

    def _must_end(self, generated: list[int]) -> bool:
        tail = self._tokenizer.decode(generated[-_CLOSE_TAIL_TOKENS:])
        if not tail.rstrip().endswith(TOOL_CALL_CLOSE):
            return False
        blocks = _BLOCK_TEXT.findall(self._tokenizer.decode(generated))
        if not blocks or not _is_call(blocks[-1]):  # e.g. "</tool_call>" written inside an argument string
            return False
        if self._single:
            return True
        return call_key(blocks[-1]) in {call_key(b) for b in blocks[:-1]}


def _is_call(block: str) -> bool:
    try:
        call = json.loads(block)
    except ValueError:
        return False
    return isinstance(call, dict) and isinstance(call.get("name"), str)


# ----------------------------------------------------------------------------------------------
# The model's output: content and tool calls, streamed
# ----------------------------------------------------------------------------------------------

_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)

_TEXT, _BARE, _HEAD_STATE, _BLOCK, _ARGS, _TAIL = range(6)


class _JsonValueEnd:
    """Finds where one JSON value ends in text that arrives in pieces (strings and escapes respected)."""

    __slots__ = ("depth", "in_string", "escape", "scalar")

    def __init__(self, first: str):
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.scalar = first not in '{["'

    def feed(self, text: str) -> int:
        """Characters of ``text`` that belong to the value, or -1 if all do and it goes on."""
        for i, c in enumerate(text):
            if self.scalar:
                if c in ",}] \t\r\n<":
                    return i
                continue
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif c == "\\":
                    self.escape = True
                elif c == '"':
                    self.in_string = False
                    if self.depth == 0:
                        return i + 1
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return -1


def _arguments_text(arguments: Any) -> str:
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        return arguments
    return json.dumps({} if arguments is None else arguments, ensure_ascii=False)


def _same_arguments(a: str, b: str) -> bool:
    try:
        return json.loads(a) == json.loads(b)
    except ValueError:
        return a.strip() == b.strip()


def _as_call(obj: Any, names: set[str]) -> Optional[tuple[str, str]]:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    arguments = obj.get("arguments", obj.get("parameters"))
    if arguments is not None and not isinstance(arguments, (dict, str)):
        return None
    return obj["name"], _arguments_text(arguments)


class ToolCallParser:
    """Splits a model's output, fed as it streams, into content and OpenAI tool-call deltas.

    :meth:`feed` and :meth:`finish` return ``(content, tool_call_deltas)``: the content that is certain
    now, and deltas with ``index`` on each, ``id``/``type``/``name`` on the first of each call only,
    arguments as string fragments (what openai-python's stream accumulator expects). Text that may
    begin a ``<tool_call>`` tag is held back until it is known. Whitespace around calls is dropped.

    A call identical to an earlier one is dropped: while a call's arguments could still turn out to
    repeat an earlier call of that function they are held back, and sent once they differ. With
    ``single`` (``parallel_tool_calls=false``) only the first call is kept.

    Example:
        >>> p = ToolCallParser(["f"])
        >>> p.feed('Sure.<tool_call>\\n{"name": "f", "arguments": {"x"')[0]
        'Sure.'
        >>> p.feed(': 1}}\\n</tool_call>')[1]
        [{'index': 0, 'function': {'arguments': ': 1}'}}]
        >>> p.calls[0]["function"]
        {'name': 'f', 'arguments': '{"x": 1}'}
    """

    def __init__(self, names: Iterable[str], single: bool = False):
        self.names = set(names)
        self.single = single
        self.calls: list[dict[str, Any]] = []
        self.content = ""
        self._buf = ""
        self._state = _TEXT
        self._started = False      # non-whitespace content seen (a bare JSON call must come first)
        self._pending_ws = ""      # trailing whitespace of the content, sent once more content follows
        self._value: Optional[_JsonValueEnd] = None
        self._held: Optional[list[str]] = None  # [name, arguments] of a call that may repeat an earlier one
        self._dropping = False                  # the current call is not kept (a second call under single)

    # -- pieces of output ----------------------------------------------------------------------
    def _content(self, text: str, out: list[str]) -> None:
        full = self._pending_ws + text
        stripped = full.rstrip()
        self._pending_ws = full[len(stripped):]
        if stripped:
            out.append(stripped)
            self.content += stripped

    def _start_call(self, name: str, arguments: str, deltas: list[dict[str, Any]]) -> None:
        call = {"id": new_tool_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
        self.calls.append(call)
        deltas.append({"index": len(self.calls) - 1, "id": call["id"], "type": "function",
                       "function": {"name": name, "arguments": arguments}})

    def _repeats(self, name: str, arguments: str, prefix: bool) -> bool:
        """Whether an earlier call has this name and these arguments (or, with ``prefix``, arguments
        that begin so)."""
        for call in self.calls:
            earlier = call["function"]
            if earlier["name"] == name and (earlier["arguments"].startswith(arguments) if prefix
                                            else _same_arguments(earlier["arguments"], arguments)):
                return True
        return False

    def _whole_call(self, name: str, arguments: str, deltas: list[dict[str, Any]]) -> None:
        """A call known whole at once: kept unless it repeats one or a single call is already kept."""
        if not (self.single and self.calls) and not self._repeats(name, arguments, prefix=False):
            self._start_call(name, arguments, deltas)

    def _open_call(self, name: str, deltas: list[dict[str, Any]]) -> None:
        """A call whose name is known and whose arguments follow in pieces."""
        if self.single and self.calls:
            self._dropping = True
        elif any(call["function"]["name"] == name for call in self.calls):
            self._held = [name, ""]
        else:
            self._start_call(name, "", deltas)

    def _arguments(self, fragment: str, deltas: list[dict[str, Any]]) -> None:
        if not fragment or self._dropping:
            return
        if self._held is not None:
            self._held[1] += fragment
            if not self._repeats(*self._held, prefix=True):
                name, arguments = self._held
                self._held = None
                self._start_call(name, arguments, deltas)
            return
        self.calls[-1]["function"]["arguments"] += fragment
        deltas.append({"index": len(self.calls) - 1, "function": {"arguments": fragment}})

    def _close_call(self, deltas: list[dict[str, Any]]) -> None:
        """The arguments of the current call are complete."""
        if self._held is not None:
            self._whole_call(*self._held, deltas)
        self._held = None
        self._dropping = False

    def _block(self, inner: str, closed: bool, content: list[str], deltas: list[dict[str, Any]]) -> None:
        """A whole ``<tool_call>`` block whose head could not be streamed: a call, or content if invalid."""
        try:
            call = _as_call(json.JSONDecoder().raw_decode(inner.strip())[0], self.names)
        except ValueError:
            call = None
        if call is not None:
            self._whole_call(*call, deltas)
        else:
            self._content(TOOL_CALL_OPEN + inner + (TOOL_CALL_CLOSE if closed else ""), content)

    # -- the state machine ---------------------------------------------------------------------
    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """Add a piece of output; return the content and tool-call deltas it completes."""
        self._buf += text
        content: list[str] = []
        deltas: list[dict[str, Any]] = []
        while self._step(content, deltas):
            pass
        return "".join(content), deltas

    def _step(self, content: list[str], deltas: list[dict[str, Any]]) -> bool:
        """Advance as far as the buffered text allows; True when the state changed (run again)."""
        buf = self._buf
        if self._state == _TEXT:
            if not self._started and self.names:
                head = buf.lstrip()
                if not head or "```".startswith(head):  # nothing yet, or perhaps the start of a fence
                    return False
                self._started = True
                if head[0] in "{[" or head.startswith("```"):
                    self._state = _BARE  # perhaps a bare JSON call: only the whole output can tell
                    return False
            at = buf.find(TOOL_CALL_OPEN)
            if at >= 0:
                self._content(buf[:at], content)
                self._buf = buf[at + len(TOOL_CALL_OPEN):]
                self._state = _HEAD_STATE
                return True
            keep = next((k for k in range(min(len(buf), len(TOOL_CALL_OPEN) - 1), 0, -1)
                         if TOOL_CALL_OPEN.startswith(buf[-k:])), 0)
            self._content(buf[:len(buf) - keep], content)
            self._buf = buf[len(buf) - keep:]
            return False
        if self._state == _HEAD_STATE:
            match = _HEAD.match(buf)
            if match:
                try:
                    name = json.loads(f'"{match.group(1)}"')
                except ValueError:
                    name = None
                if name in self.names:
                    self._open_call(name, deltas)
                    self._buf = buf[match.end():]
                    self._state = _ARGS
                    self._value = None
                    return True
                self._state = _BLOCK
                return True
            if TOOL_CALL_CLOSE in buf:
                self._state = _BLOCK
                return True
            return False
        if self._state == _BLOCK:
            at = buf.find(TOOL_CALL_CLOSE)
            if at < 0:
                return False
            self._block(buf[:at], True, content, deltas)
            self._buf = buf[at + len(TOOL_CALL_CLOSE):]
            self._state = _TEXT
            return True
        if self._state == _ARGS:
            if self._value is None:
                buf = buf.lstrip()
                if not buf:
                    self._buf = ""
                    return False
                self._value = _JsonValueEnd(buf[0])
            end = self._value.feed(buf)
            if end < 0:
                self._arguments(buf, deltas)
                self._buf = ""
                return False
            self._arguments(buf[:end], deltas)
            self._close_call(deltas)
            self._buf = buf[end:]
            self._state = _TAIL
            return True
        if self._state == _TAIL:
            at = buf.find(TOOL_CALL_CLOSE)
            if at < 0:
                return False
            self._buf = buf[at + len(TOOL_CALL_CLOSE):]
            self._state = _TEXT
            return True
        return False  # _BARE: wait for the end

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """The output ended: flush what was held back (a bare JSON output becomes calls or content)."""
        content: list[str] = []
        deltas: list[dict[str, Any]] = []
        buf, self._buf = self._buf, ""
        if self._state == _BARE:
            calls = self._bare_calls(buf)
            if calls:
                for call in calls:
                    self._whole_call(*call, deltas)
            else:
                self._content(buf, content)
        elif self._state in (_HEAD_STATE, _BLOCK):  # a block never closed: a call if its JSON is whole
            self._block(buf, False, content, deltas)
        elif self._state == _TEXT and not (self.calls and TOOL_CALL_OPEN.startswith(buf.strip())):
            self._content(buf, content)  # (a next call cut short at "<tool_c" is not content)
        # Cut short inside the arguments: a held call so far repeats an earlier one, so nothing is lost.
        self._held = None
        self._dropping = False
        if not self.calls and self._pending_ws:
            content.append(self._pending_ws)
            self.content += self._pending_ws
        self._pending_ws = ""
        return "".join(content), deltas

    def _bare_calls(self, text: str) -> list[tuple[str, str]]:
        text = text.strip()
        fenced = _FENCE.match(text)
        if fenced:
            text = fenced.group(1)
        try:
            obj = json.loads(text)
        except ValueError:
            return []
        items = obj if isinstance(obj, list) else [obj]
        calls = [_as_call(item, self.names) for item in items]
        return calls if calls and all(calls) else []


def parse_tool_calls(text: str, names: Iterable[str], single: bool = False
                     ) -> tuple[Optional[str], list[dict[str, Any]]]:
    """A whole output as ``(content, tool_calls)``; content is None when there are calls and no text.
    The same parser as streaming, so both agree (``single``: keep the first call only).

    Example:
        >>> parse_tool_calls('{"name": "f", "arguments": {"x": 1}}', ["f"])[1][0]["function"]
        {'name': 'f', 'arguments': '{"x": 1}'}
        >>> parse_tool_calls("Hello", ["f"])
        ('Hello', [])
    """
    parser = ToolCallParser(names, single)
    parser.feed(text)
    parser.finish()
    if parser.calls:
        return parser.content or None, parser.calls
    return parser.content, []
