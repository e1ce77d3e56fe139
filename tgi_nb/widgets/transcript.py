"""The chat transcript: an anywidget whose front-end appends streamed text instead of receiving it again.

Finished messages live in the synced ``entries`` trait (sent when a turn starts or ends). While a reply
streams, only the new text travels, as numbered custom ``{"op": "append", "seq", "field", "text"}`` messages
that the browser appends to the last message (``field``: ``content``, or ``reasoning`` for the model's
thinking): a long answer never resends what is already on screen. The state the kernel sends carries the
streamed text so far, so a page reloaded mid-answer, or a second view, shows the whole conversation; a view that
missed appends asks for that state again. Replies are rendered as markdown in the kernel (markdown-it-py, raw
HTML escaped, so a model cannot inject markup; code blocks highlighted by Pygments) when they end. The
front-end (``static/transcript.js``) adds copy buttons, the folded thinking block, tooltips and actions.
"""

from __future__ import annotations

import html as html_lib
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import anywidget
import traitlets

_STATIC = Path(__file__).with_name("static")
FIELDS = ("content", "reasoning")


def _highlight(code: str, lang: str, _attrs: Any) -> str:
    """A fenced code block as Pygments' HTML (class names styled in JupyterLab's code colours); plain when the
    language is unknown."""
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import get_lexer_by_name
    from pygments.util import ClassNotFound

    try:
        lexer = get_lexer_by_name(lang.strip()) if lang.strip() else None
    except ClassNotFound:
        lexer = None
    if lexer is None:
        return ""  # markdown-it escapes it as usual
    body = highlight(code, lexer, HtmlFormatter(nowrap=True))
    return f'<pre class="tgi-code"><code class="language-{html_lib.escape(lang.strip())}">{body}</code></pre>'


def render_markdown(text: str) -> str:
    """Markdown to HTML as the transcript shows a reply; raw HTML in the text is escaped, fenced code with a
    known language is highlighted.

    Example:
        >>> render_markdown("**hi** <b>")
        '<p><strong>hi</strong> &lt;b&gt;</p>\\n'
        >>> '<span class="k">def</span>' in render_markdown("```python\\ndef f(): pass\\n```")
        True
    """
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False, "highlight": _highlight}).enable("table").render(text)


def _entries_to_json(entries: list[dict], widget: "Transcript") -> list[dict]:
    return widget._with_streamed(entries)


class Transcript(anywidget.AnyWidget):
    """Chat messages; the last one may be streaming (``start_reply``, ``append``, ``end_reply``).

    An entry is a dict: ``role`` (user, assistant or error), ``text``, ``html`` (rendered markdown), and for
    replies ``stats`` (the line under it; ``stats_parts``: its pieces with their tooltips), ``settings`` (what
    it was made with), ``reasoning`` (the model's thinking), ``notice`` (a sentence under it) and ``actions``
    (``[name, label, tooltip]`` buttons; a click calls the handler given to ``on_action``).

    Example:
        >>> t = Transcript()
        >>> t.add("user", "Hi"); t.start_reply(); t.append("Hel"); t.append("lo")
        >>> t.last_text, t.get_state("entries")["entries"][-1]["text"]    # the state a reloaded page gets
        ('Hello', 'Hello')
        >>> t.end_reply("Hello", stats="2 tokens")
        >>> [(e["role"], e["text"]) for e in t.entries]
        [('user', 'Hi'), ('assistant', 'Hello')]
    """

    _esm = _STATIC / "transcript.js"
    _css = _STATIC / "transcript.css"
    entries = traitlets.List(traitlets.Dict()).tag(sync=True, to_json=_entries_to_json)

    def __init__(self, **kwargs: Any):
        # Appends and the state are sent under one lock: a view never gets a state older than an append after it.
        self._lock = threading.RLock()
        self._streamed: dict[str, list[str]] = {field: [] for field in FIELDS}
        self._seq = 0  # appends sent for the streaming reply
        self._actions: dict[str, Callable[[int], None]] = {}
        super().__init__(**kwargs)
        self.add_class("tgi-chat-transcript-widget")
        self.appends_sent = 0  # streamed updates sent to the browser, for tests and the update-rate figure
        self.on_msg(self._front_end_message)

    @property
    def last_text(self) -> str:
        """The last message's text; while a reply streams, what it shows so far ("" with no message)."""
        if not self.entries:
            return ""
        last = self.entries[-1]
        return "".join(self._streamed["content"]) if last.get("streaming") else last.get("text") or ""

    @property
    def streamed_reasoning(self) -> str:
        """The thinking the streaming reply showed so far ("" when none streams)."""
        return "".join(self._streamed["reasoning"])

    def add(self, role: str, text: str, *, markdown: bool = False, stats: Optional[str] = None) -> None:
        """Append a finished message (role: user, assistant or error)."""
        entry = {"role": role, "text": text, "html": render_markdown(text) if markdown else None, "stats": stats}
        self.entries = [*self.entries, entry]

    def start_reply(self, continued: str = "") -> None:
        """Open an assistant message that ``append`` will fill: a new one, or with ``continued`` (the last
        reply's text), that reply again, to be extended."""
        with self._lock:
            self._streamed = {"content": [continued] if continued else [], "reasoning": []}
            self._seq = 0
            entries = list(self.entries[:-1] if continued else self.entries)
            self.entries = [*entries, {"role": "assistant", "text": "", "streaming": True}]

    def append(self, text: str, field: str = "content") -> None:
        """Send ``text`` to be appended to the streaming reply's answer (``field="reasoning"``: its thinking);
        only the new text travels."""
        if not text:
            return
        with self._lock:
            self._streamed[field].append(text)
            self.appends_sent += 1
            self.send({"op": "append", "seq": self._seq, "field": field, "text": text})
            self._seq += 1

    def end_reply(self, text: str, *, stats: Optional[str] = None, role: str = "assistant", **extra: Any) -> None:
        """Replace the streaming reply by its final form: markdown, with its stats line; ``extra``: the entry's
        other fields (``stats_parts``, ``settings``, ``reasoning``, ``notice``, ``actions``)."""
        with self._lock:
            entries = list(self.entries)
            if entries and entries[-1].get("streaming"):
                entries.pop()
            html = render_markdown(text) if role == "assistant" else None
            self._streamed = {field: [] for field in FIELDS}
            entry = {"role": role, "text": text, "html": html, "stats": stats,
                     **{k: v for k, v in extra.items() if v}}
            self.entries = [*entries, entry]

    def update_entry(self, index: int, **fields: Any) -> None:
        """Change fields of a finished message (``actions=None`` removes its buttons)."""
        with self._lock:
            entries = list(self.entries)
            entries[index] = {k: v for k, v in {**entries[index], **fields}.items() if v is not None}
            self.entries = entries

    def truncate(self, count: int) -> None:
        """Keep the first ``count`` messages."""
        self.entries = list(self.entries[:count])

    def on_action(self, name: str, handler: Callable[[int], None]) -> None:
        """Call ``handler(index of the message)`` when the button ``name`` of an entry's ``actions`` is clicked."""
        self._actions[name] = handler

    # ------------------------------------------------------------------------------------------ front-end
    def _with_streamed(self, entries: list[dict]) -> list[dict]:
        with self._lock:
            if not entries or not entries[-1].get("streaming"):
                return entries
            streaming = {**entries[-1], "text": "".join(self._streamed["content"]),
                         "reasoning": "".join(self._streamed["reasoning"]), "seq": self._seq}
            return [*entries[:-1], streaming]

    def send_state(self, key: Any = None) -> None:
        with self._lock:
            super().send_state(key)

    def _front_end_message(self, _widget: Any, content: dict, _buffers: Any) -> None:
        if content.get("op") == "sync":  # a view missed appends: the whole state again
            self.send_state("entries")
        elif content.get("op") == "action" and content.get("name") in self._actions:
            self._actions[content["name"]](int(content.get("index", -1)))
