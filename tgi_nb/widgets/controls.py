"""Small builders the widgets share: a button with its stable CSS class and handler, a widget with its class."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import ipywidgets as w

W = TypeVar("W", bound=w.DOMWidget)


def styled(widget: W, css: str) -> W:
    """``widget`` with the CSS class ``css`` (the stable names tests and themes use).

    Example:
        >>> "tgi-x" in styled(w.HTML(), "tgi-x")._dom_classes
        True
    """
    widget.add_class(css)
    return widget


def button(label: str, css: str, on_click: Callable[[], Any], style: str = "", icon: str = "") -> w.Button:
    """A button sized to its label, with the CSS class ``css``, calling ``on_click()`` when clicked.

    Example:
        >>> clicked = []
        >>> send = button("Send", "tgi-chat-send", lambda: clicked.append(1), style="primary")
        >>> send.click(); clicked, send.description
        ([1], 'Send')
    """
    widget = w.Button(description=label, button_style=style, icon=icon, layout=w.Layout(width="auto"))
    widget.on_click(lambda _: on_click())
    return styled(widget, css)
