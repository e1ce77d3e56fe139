"""A chat's conversation as files: OpenAI's message list as JSON, or markdown with a heading per message; read
back from either. The chat widget offers both as downloads and imports them."""

from __future__ import annotations

import base64
import html
import json
import re
from typing import Any

ROLES = ("system", "user", "assistant")
_HEADING = re.compile(r"^### (system|user|assistant)\s*$", re.MULTILINE)


def to_markdown(messages: list[dict[str, Any]]) -> str:
    """The conversation as markdown: ``### role`` then the message.

    Example:
        >>> print(to_markdown([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]))
        ### user
        <BLANKLINE>
        Hi
        <BLANKLINE>
        ### assistant
        <BLANKLINE>
        Hello!
        <BLANKLINE>
    """
    return "\n".join(f"### {m['role']}\n\n{m['content']}\n" for m in messages)


def parse_conversation(text: str) -> list[dict[str, str]]:
    """Messages from a JSON list in OpenAI's format (or ``{"messages": [...]}``) or from :func:`to_markdown`'s
    markdown.

    Raises ``ValueError`` naming what is wrong: a role outside system / user / assistant, a message without
    text content, a text with neither form.

    Example:
        >>> parse_conversation('[{"role": "user", "content": "Hi"}]')
        [{'role': 'user', 'content': 'Hi'}]
        >>> parse_conversation("### user\\n\\nHi\\n\\n### assistant\\n\\nHello!\\n")
        [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}]
    """
    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        data = json.loads(stripped)
        items = data.get("messages") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise ValueError("messages: expected a JSON list of {role, content} objects")
        messages = []
        for i, item in enumerate(items):
            role = item.get("role") if isinstance(item, dict) else None
            if role not in ROLES:
                raise ValueError(f"messages[{i}].role: must be one of {', '.join(ROLES)}, got {role!r}")
            if not isinstance(item.get("content"), str):
                raise ValueError(f"messages[{i}].content: must be text, got {type(item.get('content')).__name__}")
            messages.append({"role": role, "content": item["content"]})
        return messages
    parts = _HEADING.split(text)
    if len(parts) < 3:
        raise ValueError("conversation: expected a JSON list of messages or markdown with '### user' headings")
    return [{"role": role, "content": body.strip()} for role, body in zip(parts[1::2], parts[2::2])]


def download_link(text: str, filename: str, label: str, mime: str, css: str) -> str:
    """An HTML link that saves ``text`` as ``filename`` when clicked (a data: URL: no server round trip).

    Example:
        >>> download_link("a,b", "t.csv", "CSV", "text/csv", "tgi-x")[:61]
        '<a class="tgi-x" download="t.csv" href="data:text/csv;base64,'
    """
    data = base64.b64encode(text.encode()).decode()
    return (f'<a class="{css}" download="{html.escape(filename)}" href="data:{mime};base64,{data}" '
            f'title="Save as {html.escape(filename)}">{html.escape(label)}</a>')
