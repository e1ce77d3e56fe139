"""The model's output as OpenAI tool calls: :class:`ToolCallParser` (streamed), :func:`parse_tool_calls`
(whole), and :class:`ToolCallGuard`, the logits processor that ends an output at a repeated call.

The text format is Hermes' (see tools.py, which tells the model about the tools and builds the grammar
that forces calls)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Example:
    >>> parse_tool_calls('<tool_call>\\n{"name": "f", "arguments": {}}\\n</tool_call>', ["f"])[1][0]["function"]
    {'name': 'f', 'arguments': '{}'}
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Callable, Iterable, Optional

import torch

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


def new_tool_call_id() -> str:
    """An id in OpenAI's shape.

    Example:
        >>> new_tool_call_id().startswith("call_")
        True
    """
    return "call_" + uuid.uuid4().hex[:24]

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

    __slots__ = ("_inner", "_tokenizer", "_eos", "_single", "_ended", "_answer")

    def __init__(self, inner: Optional[Callable[[list[int], torch.Tensor], torch.Tensor]], tokenizer: Any,
                 eos_token_ids: list[int], single: bool, answer: Optional[Callable[[str], str]] = None):
        self._inner = inner
        self._answer = answer  # whole output -> its answer, for a reasoning model (calls while thinking are none)
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
        text = self._tokenizer.decode(generated)
        blocks = _BLOCK_TEXT.findall(self._answer(text) if self._answer is not None else text)
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
