"""``ChatInput``: the chat's input box and Send button, where Enter sends and Shift+Enter adds a line
(ipywidgets' Textarea has no key events, so this is a small anywidget; ``static/chat_input.js``). A send
carries its text, so it never depends on the order in which two widgets' messages reach the kernel."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import anywidget
import traitlets


class ChatInput(anywidget.AnyWidget):
    """A text box and its Send button: Enter or Send calls the handlers given to ``on_submit`` with the text
    and empties the box (Shift+Enter: a new line); nothing is sent while ``ready`` is False.

    Example:
        >>> box = ChatInput(placeholder="Ask something")
        >>> sent = []
        >>> box.on_submit(sent.append)
        >>> box._front_end_message(box, {"op": "submit", "text": "Hi"}, [])    # what the browser sends on Enter
        >>> sent
        ['Hi']
    """

    _esm = Path(__file__).with_name("static") / "chat_input.js"
    _css = """
    .tgi-chat-input { flex: 1 1 auto; display: flex; gap: 4px; align-items: flex-end; }
    .tgi-chat-input .tgi-chat-send { width: auto; }
    .tgi-chat-input-area { flex: 1 1 auto; min-height: 48px; resize: vertical; font: inherit; padding: 4px 6px;
      box-sizing: border-box; color: var(--jp-ui-font-color1, black); background: var(--jp-layout-color1, white);
      border: 1px solid var(--jp-border-color1, #bbb); border-radius: 2px; }
    """
    value = traitlets.Unicode("").tag(sync=True)
    placeholder = traitlets.Unicode("").tag(sync=True)
    ready = traitlets.Bool(True, help="Enter and Send send (False while a reply streams)").tag(sync=True)

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._handlers: list[Callable[[str], Any]] = []
        self.on_msg(self._front_end_message)

    def on_submit(self, handler: Callable[[str], Any]) -> None:
        """Call ``handler(text)`` when the user presses Enter or clicks Send."""
        self._handlers.append(handler)

    def _front_end_message(self, _widget: Any, content: dict, _buffers: Any) -> None:
        if content.get("op") == "submit":
            for handler in self._handlers:
                handler(content.get("text", ""))
