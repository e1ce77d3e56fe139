"""Reasoning models: the one parser that splits a model's thinking (``<think>…</think>``) from its answer.

Which parser runs: ``--reasoning-parser`` (vLLM's flag and names), else the chat template's say: a template
that writes ``<think>`` is a thinking model's (Qwen3, SmolLM3, QwQ, DeepSeek-R1 distills, GLM-4.5) and gets
``qwen3``; any other template gets none, so an ordinary model's output is never touched.

- ``qwen3`` (``glm45``, ``deepseek_v3`` behave the same): thinking is a ``<think>`` block that opens the
  output; an output without one is all answer.
- ``deepseek_r1``: the output is thinking until ``</think>`` even when the model did not write ``<think>``
  (R1's template opens the block itself); an output that never closes it is all thinking (cut short).
- ``none``: no splitting, whatever the template.

Where one request's output starts is read off its rendered prompt (:func:`start_state`): inside the block
when the prompt ends with an open ``<think>`` (templates that open it for the model), in the answer when it
ends with a closed one (Qwen3 and SmolLM3 with ``enable_thinking=False`` write an empty block).

Everything downstream reads the answer only: tool calls and JSON are parsed from it, and a grammar for
``tool_choice`` / ``response_format`` lets a thinking block run free first (:func:`think_grammar`).

Example:
    >>> splitter = ReasoningSplitter(MAY_OPEN)
    >>> splitter.feed("<think>\\nThe user greets.</th"), splitter.feed("ink>\\n\\nHello!")
    (('The user greets.', ''), ('', 'Hello!'))
"""

from __future__ import annotations

import json
from typing import Any, Optional

from .errors import BadRequest

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# Parser name -> whether the output is thinking until </think> even without an opening tag.
PARSERS = {"qwen3": False, "glm45": False, "deepseek_v3": False, "deepseek_r1": True}
NONE = "none"

# Where an output starts: inside a think block, before a block it may open, or in the answer.
THINKING, MAY_OPEN, ANSWER = "thinking", "may_open", "answer"

# reasoning.effort / reasoning_effort values (OpenAI's), and those that mean "do not think".
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
_NO_THINKING = ("none", "minimal")

# Whitespace a grammar allows between </think> and the answer (Qwen3 writes "\n\n").
_GAP = r"/[ \t\r\n]{0,4}/"


def check_parser_name(name: Optional[str]) -> Optional[str]:
    """``name`` if it is a known parser (or None / ``none``); else a ValueError listing them.

    Example:
        >>> check_parser_name("qwen3")
        'qwen3'
        >>> check_parser_name("granite")
        Traceback (most recent call last):
        ...
        ValueError: reasoning_parser: must be one of 'qwen3', 'glm45', 'deepseek_v3', 'deepseek_r1', 'none', got 'granite'
    """
    if name is None or name == NONE or name in PARSERS:
        return name
    allowed = ", ".join(repr(n) for n in (*PARSERS, NONE))
    raise ValueError(f"reasoning_parser: must be one of {allowed}, got {name!r}")


def reasoning_parser(name: Optional[str], template: Optional[str]) -> Optional[str]:
    """The parser a server runs: ``name`` when set (``none`` turns splitting off), else ``qwen3`` for a chat
    template that writes ``<think>`` (to open the block for the model, or to render earlier turns' thinking),
    else None.

    Example:
        >>> reasoning_parser(None, "{{ '<think>' }}...{{ '</think>' }}"), reasoning_parser(None, "{{ x }}")
        ('qwen3', None)
    """
    if name is not None:
        return None if check_parser_name(name) == NONE else name
    if template and THINK_OPEN in template:
        return "qwen3"
    return None


def start_state(parser: Optional[str], prompt: str) -> Optional[str]:
    """Where the output of ``prompt`` starts (:data:`THINKING`, :data:`MAY_OPEN` or :data:`ANSWER`), or None
    when no parser runs.

    Example:
        >>> start_state("qwen3", "<|im_start|>assistant\\n<think>\\n"), start_state("qwen3", "assistant\\n")
        ('thinking', 'may_open')
        >>> start_state("deepseek_r1", "assistant\\n<think>\\n\\n</think>\\n\\n")
        'answer'
    """
    if parser is None:
        return None
    tail = prompt.rstrip()
    if tail.endswith(THINK_OPEN):
        return THINKING
    if tail.endswith(THINK_CLOSE):
        return ANSWER
    return THINKING if PARSERS[parser] else MAY_OPEN


def effort_template_kwargs(effort: Optional[str], parser: Optional[str], template: str, param: str
                           ) -> dict[str, Any]:
    """The chat-template variables that carry ``effort`` (``reasoning.effort`` or ``reasoning_effort``) to
    this model, or a 400 naming ``param`` when the model cannot do what it asks.

    A template with Qwen3's switch gets ``enable_thinking``: false for ``none`` / ``minimal``, true for the
    rest; a template that reads ``reasoning_effort`` (gpt-oss') gets the value itself. A model without a
    switch either never thinks (no parser: ``none`` / ``minimal`` are what it does anyway, more is a 400)
    or always does (a parser: ``none`` / ``minimal`` are a 400).

    Example:
        >>> effort_template_kwargs("none", "qwen3", "{% if enable_thinking %}...{% endif %}", "reasoning.effort")
        {'enable_thinking': False}
        >>> effort_template_kwargs("high", None, "{{ messages }}", "reasoning.effort")
        Traceback (most recent call last):
        ...
        tgi_nb.server.errors.BadRequest: reasoning.effort: this model does not reason (its chat template has no thinking switch and no reasoning parser runs); only 'none' or 'minimal' can be honoured, got 'high'
    """
    if effort is None:
        return {}
    if effort not in EFFORTS:
        allowed = ", ".join(repr(e) for e in EFFORTS)
        raise BadRequest(f"{param}: must be one of {allowed}, got {effort!r}", param=param)
    thinking = effort not in _NO_THINKING
    kwargs: dict[str, Any] = {}
    if "enable_thinking" in template:
        kwargs["enable_thinking"] = thinking
    if "reasoning_effort" in template:
        kwargs["reasoning_effort"] = effort
    if kwargs:
        return kwargs
    if parser is None and thinking:
        raise BadRequest(f"{param}: this model does not reason (its chat template has no thinking switch and no "
                         f"reasoning parser runs); only 'none' or 'minimal' can be honoured, got {effort!r}",
                         param=param)
    if parser is not None and not thinking:
        raise BadRequest(f"{param}: this model always thinks (its chat template has no thinking switch); "
                         f"use 'low', 'medium' or 'high', got {effort!r}", param=param)
    return {}


def answer_text(text: str, state: Optional[str]) -> str:
    """The answer part of a whole output (what tool calls and JSON are read from).

    Example:
        >>> answer_text("<think>a</think>\\nb", MAY_OPEN), answer_text("still thinking", THINKING)
        ('\\nb', '')
    """
    if state is None or state == ANSWER:
        return text
    if state == MAY_OPEN and not text.lstrip().startswith(THINK_OPEN):
        return text
    at = text.find(THINK_CLOSE)
    return "" if at < 0 else text[at + len(THINK_CLOSE):]


def think_grammar(grammar: str, state: str) -> str:
    """``grammar`` (an llguidance grammar: Lark text or a top-level JSON grammar) behind the think block an
    output starting in ``state`` may (:data:`MAY_OPEN`) or must (:data:`THINKING`) begin with. The block's
    text is free; the constraint starts after ``</think>``.

    Example:
        >>> json.loads(think_grammar('start: "yes"', THINKING))["grammars"][0]["lark_grammar"].splitlines()[0]
        'start: thinking @answer'
    """
    if state == ANSWER:
        return grammar
    try:
        top = json.loads(grammar)
    except ValueError:
        top = None
    if not (isinstance(top, dict) and isinstance(top.get("grammars"), list) and top["grammars"]):
        top = {"grammars": [{"lark_grammar": grammar}]}
    first = top["grammars"][0]
    if not first.get("name"):
        first["name"] = "answer"
    opening = f'"{THINK_OPEN}" ' if state == MAY_OPEN else ""
    start = f"start: thinking @{first['name']}" if state == THINKING else f"start: thinking? @{first['name']}"
    lark = "\n".join([start, f"thinking: {opening}body GAP",
                      f'body[stop="{THINK_CLOSE}"]: /(.|\\n)*/', f"GAP: {_GAP}"])
    return json.dumps({**top, "grammars": [{"name": "reasoning", "lark_grammar": lark}, *top["grammars"]]})


class ReasoningSplitter:
    """Splits one sample's output, fed as it streams, into thinking and answer.

    :meth:`feed` and :meth:`finish` return ``(reasoning, content)``, the text of each that is certain now: a
    piece that may begin a tag is held back until it is known. Whitespace just inside the block and between
    ``</think>`` and the answer (also the prompt's, for an output starting in :data:`ANSWER`) is dropped. :attr:`thinking` says whether the output is inside the block.

    Example:
        >>> s = ReasoningSplitter(THINKING)
        >>> s.feed("Two plus two. </think>\\n\\n4"), s.finish()
        (('Two plus two.', '4'), ('', ''))
    """

    __slots__ = ("state", "_buf", "_pending_ws", "_skip_ws")

    def __init__(self, state: str):
        self.state = state
        self._buf = ""
        self._pending_ws = ""                 # the thinking's trailing whitespace, sent if more thinking follows
        # At the start of the block, or of an answer after one (ANSWER: the prompt closed the block).
        self._skip_ws = state in (THINKING, ANSWER)

    @property
    def thinking(self) -> bool:
        return self.state == THINKING

    def feed(self, text: str) -> tuple[str, str]:
        """Add a piece of output; return the thinking and answer text it completes."""
        self._buf += text
        reasoning: list[str] = []
        content: list[str] = []
        while self._step(reasoning, content):
            pass
        return "".join(reasoning), "".join(content)

    def _think(self, text: str, out: list[str]) -> None:
        full = self._pending_ws + text
        stripped = full.rstrip()
        self._pending_ws = full[len(stripped):]
        if stripped:
            out.append(stripped)

    def _step(self, reasoning: list[str], content: list[str]) -> bool:
        buf = self._buf
        if self.state == MAY_OPEN:
            head = buf.lstrip()
            if not head or (THINK_OPEN.startswith(head) and head != THINK_OPEN):
                return False
            if head.startswith(THINK_OPEN):
                self._buf = head[len(THINK_OPEN):]
                self.state, self._skip_ws = THINKING, True
            else:
                self.state = ANSWER
            return True
        if self._skip_ws:
            buf = buf.lstrip()
            if not buf:
                self._buf = ""
                return False
            self._skip_ws = False
        if self.state == THINKING:
            at = buf.find(THINK_CLOSE)
            if at >= 0:
                self._think(buf[:at], reasoning)
                self._pending_ws = ""
                self._buf = buf[at + len(THINK_CLOSE):]
                self.state, self._skip_ws = ANSWER, True
                return True
            keep = next((k for k in range(min(len(buf), len(THINK_CLOSE) - 1), 0, -1)
                         if THINK_CLOSE.startswith(buf[-k:])), 0)
            self._think(buf[:len(buf) - keep], reasoning)
            self._buf = buf[len(buf) - keep:]
            return False
        if buf:
            content.append(buf)
        self._buf = ""
        return False

    def finish(self) -> tuple[str, str]:
        """The output ended: what was held back (a tag never completed is text of the part it was in)."""
        buf, self._buf = self._buf, ""
        if self.state == THINKING:
            self._pending_ws = ""
            return buf.rstrip(), ""
        return "", buf.lstrip() if self._skip_ws else buf
