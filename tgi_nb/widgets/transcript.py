"""The chat transcript: an anywidget whose front-end appends streamed text instead of receiving it again.

Finished messages live in the synced ``entries`` trait (sent when a turn starts or ends). While a reply
streams, only the new text travels, as custom ``{"op": "append", "text": ...}`` messages that the browser
appends to the last message: a long answer never resends what is already on screen. Replies are rendered as
markdown in the kernel (markdown-it-py, raw HTML escaped, so a model cannot inject markup) when they end.
"""

from __future__ import annotations

from typing import Any, Optional

import anywidget
import traitlets

_ESM = r"""
function entryNode(entry) {
  const node = document.createElement("div");
  node.className = `tgi-chat-message tgi-chat-${entry.role}` + (entry.streaming ? " tgi-chat-streaming" : "");
  const body = document.createElement("div");
  body.className = "tgi-chat-body";
  if (entry.html) { body.innerHTML = entry.html; } else { body.textContent = entry.text || ""; }
  node.appendChild(body);
  if (entry.stats) {
    const stats = document.createElement("div");
    stats.className = "tgi-chat-stats";
    stats.textContent = entry.stats;
    node.appendChild(stats);
  }
  return node;
}

function render({ model, el }) {
  el.classList.add("tgi-chat-transcript");
  const draw = () => {
    el.replaceChildren(...model.get("entries").map(entryNode));
    el.scrollTop = el.scrollHeight;
  };
  model.on("change:entries", draw);
  model.on("msg:custom", (msg) => {
    if (msg.op !== "append") return;
    const body = el.querySelector(".tgi-chat-streaming:last-child .tgi-chat-body");
    if (!body) return;
    body.appendChild(document.createTextNode(msg.text));
    el.scrollTop = el.scrollHeight;
  });
  draw();
}
export default { render };
"""

_CSS = """
.tgi-chat-transcript { max-height: 420px; overflow-y: auto; padding: 4px; font-size: 13px;
  border: 1px solid var(--jp-border-color2, #ddd); border-radius: 4px; min-height: 60px; }
.tgi-chat-message { margin: 6px 0; padding: 6px 10px; border-radius: 8px; max-width: 92%; }
.tgi-chat-user { background: var(--jp-brand-color3, #dbeafe); margin-left: auto; white-space: pre-wrap; }
.tgi-chat-assistant { background: var(--jp-layout-color2, #f3f4f6); }
.tgi-chat-streaming .tgi-chat-body { white-space: pre-wrap; }
.tgi-chat-error { background: #fee2e2; color: #991b1b; white-space: pre-wrap; }
.tgi-chat-body pre { background: var(--jp-layout-color3, #e5e7eb); padding: 6px; overflow-x: auto; }
.tgi-chat-body p { margin: 2px 0; }
.tgi-chat-stats { font-size: 11px; opacity: 0.7; margin-top: 4px; }
"""


def render_markdown(text: str) -> str:
    """Markdown to HTML as the transcript shows a reply; raw HTML in the text is escaped.

    Example:
        >>> render_markdown("**hi** <b>")
        '<p><strong>hi</strong> &lt;b&gt;</p>\\n'
    """
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


class Transcript(anywidget.AnyWidget):
    """Chat messages; the last one may be streaming (``start_reply``, ``append``, ``end_reply``).

    Example:
        >>> t = Transcript()
        >>> t.add("user", "Hi"); t.start_reply(); t.append("Hel"); t.append("lo")
        >>> t.last_text
        'Hello'
        >>> t.end_reply("Hello", stats="2 tokens")
        >>> [(e["role"], e["text"]) for e in t.entries]
        [('user', 'Hi'), ('assistant', 'Hello')]
    """

    _esm = _ESM
    _css = _CSS
    entries = traitlets.List(traitlets.Dict()).tag(sync=True)

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.add_class("tgi-chat-transcript-widget")
        self.appends_sent = 0  # streamed updates sent to the browser, for tests and the update-rate figure
        self._streamed: list[str] = []  # what the streaming reply shows so far (the browser has it, not entries)

    @property
    def last_text(self) -> str:
        """The last message's text; while a reply streams, what it shows so far ("" with no message)."""
        if not self.entries:
            return ""
        last = self.entries[-1]
        return "".join(self._streamed) if last.get("streaming") else last.get("text") or ""

    def add(self, role: str, text: str, *, markdown: bool = False, stats: Optional[str] = None) -> None:
        """Append a finished message (role: user, assistant or error)."""
        entry = {"role": role, "text": text, "html": render_markdown(text) if markdown else None, "stats": stats}
        self.entries = [*self.entries, entry]

    def start_reply(self) -> None:
        """Open an empty assistant message that ``append`` will fill."""
        self._streamed = []
        self.entries = [*self.entries, {"role": "assistant", "text": "", "streaming": True}]

    def append(self, text: str) -> None:
        """Send ``text`` to be appended to the streaming reply (only the new text travels)."""
        if text:
            self.appends_sent += 1
            self._streamed.append(text)
            self.send({"op": "append", "text": text})

    def end_reply(self, text: str, *, stats: Optional[str] = None, role: str = "assistant") -> None:
        """Replace the streaming reply by its final form: markdown, with its stats line."""
        entries = list(self.entries)
        if entries and entries[-1].get("streaming"):
            entries.pop()
        html = render_markdown(text) if role == "assistant" else None
        self.entries = [*entries, {"role": role, "text": text, "html": html, "stats": stats}]

    def truncate(self, count: int) -> None:
        """Keep the first ``count`` messages."""
        self.entries = list(self.entries[:count])
