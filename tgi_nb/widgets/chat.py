"""``ChatWidget``: a streaming chat through the official ``openai`` client.

A turn runs in the widget's :class:`~tgi_nb.widgets.lifecycle.Worker`: the cell or click that starts it returns
at once. Streamed text is coalesced to about 15 browser updates a second and sent append-only (see
``transcript.py``); the stream itself is :func:`~tgi_nb.widgets.streaming.stream_reply`. Stop closes the HTTP
stream; the server sees the client go away, aborts the request and frees its KV blocks. Enter sends
(``chat_input.py``); the conversation downloads as OpenAI's message JSON or markdown and imports from either
(``conversation.py``).
"""

from __future__ import annotations

import html
import json
import threading
import time
from typing import Any, Optional, Union

import ipywidgets as w

from .chat_input import ChatInput
from .controls import button, styled
from .conversation import download_link, parse_conversation, to_markdown
from .lifecycle import UPDATES_PER_SECOND, Job, Worker, replace_in_cell
from .parameters import ParametersWidget, python_call, split_openai_kwargs
from .streaming import Reply, describe_error, describe_settings, format_stats, stream_reply
from .target import Target
from .transcript import Transcript

__all__ = ["ChatWidget", "describe_error", "format_stats"]


class ChatWidget(w.VBox):
    """A streaming chat with an endpoint (``create_inference_endpoint``'s or ``connect()``'s), an
    ``openai.OpenAI`` client or a base URL.

    ``parameters`` is a ``ParametersWidget`` (read at each request) or a dict in OpenAI's names; the system
    prompt comes from ``system_prompt`` or the parameters widget. ``send`` returns at once; ``wait`` blocks
    until the reply ended (scripts and tests only: the UI never needs it). With ``history=False`` each prompt
    starts a new conversation.

    Example:
        >>> from tgi_nb.widgets import ChatWidget, ParametersWidget
        >>> params = ParametersWidget(temperature=0.0, max_tokens=64)
        >>> chat = ChatWidget(endpoint, parameters=params)          # doctest: +SKIP
        >>> chat                                                    # doctest: +SKIP
        >>> chat.send("What is the capital of France?").wait()      # doctest: +SKIP
        >>> chat.messages[-1]["content"], chat.last_stats["tokens"]  # doctest: +SKIP
        ('The capital of France is Paris.', 8)
    """

    def __init__(self, target: Any, parameters: Union[ParametersWidget, dict, None] = None,
                 system_prompt: Optional[str] = None, *, model: Optional[str] = None,
                 api_key: Optional[str] = None, updates_per_second: float = UPDATES_PER_SECOND,
                 history: bool = True):
        if parameters is not None and not isinstance(parameters, (ParametersWidget, dict)):
            raise TypeError(f"parameters: expected a ParametersWidget or a dict, got {type(parameters).__name__}")
        if not 0 < updates_per_second <= 60:
            raise ValueError(f"updates_per_second: must be in (0, 60], got {updates_per_second}")
        self.target = Target.of(target, model=model, api_key=api_key)
        self.parameters = parameters
        self.system_prompt = system_prompt
        self.updates_per_second = updates_per_second
        self.update_interval = 1.0 / updates_per_second
        self.history = history  # False: each prompt is a new conversation
        self.messages: list[dict[str, Any]] = []
        self.last_stats: Optional[dict[str, Any]] = None
        self._worker = Worker("chat")
        self._turn_starts: list[tuple[int, int, str]] = []  # (transcript length, len(messages), prompt)
        self._lock = threading.RLock()

        self.transcript = Transcript()
        self.transcript.on_action("continue", self._continue_clicked)
        self.input = ChatInput(placeholder="Ask something (Enter sends, Shift+Enter: a new line)",
                               layout=w.Layout(width="auto", flex="1 1 auto"))
        self.input.on_submit(self._submitted)
        self.stop_button = button("Stop", "tgi-chat-stop", self.stop, style="danger")
        self.stop_button.disabled = True
        self.regenerate_button = button("Regenerate", "tgi-chat-regenerate", lambda: self._guard(self.regenerate))
        self.edit_button = button("Edit last", "tgi-chat-edit", lambda: self._guard(self.edit_last))
        self.clear_button = button("Clear", "tgi-chat-clear", lambda: self._guard(self.clear))
        self.status = styled(w.HTML(), "tgi-chat-status")
        self.code = styled(w.HTML(), "tgi-chat-code")
        self.system_line = styled(w.HTML(), "tgi-chat-system")
        self.exports = styled(w.HTML(), "tgi-chat-export")
        self.importer = styled(w.FileUpload(accept=".json,.md", description="Import", icon="upload",
                                            layout=w.Layout(width="auto")), "tgi-chat-import")
        self.importer.observe(self._imported, "value")
        buttons = w.HBox([self.stop_button, self.regenerate_button, self.edit_button,
                          self.clear_button, self.importer, self.exports],
                         layout=w.Layout(align_items="center", flex_flow="row wrap"))
        super().__init__([w.HTML(f"<b>Chat</b> with <code>{html.escape(self.target.label)}</code>"),
                          self.system_line, self.transcript, w.HBox([self.input]), buttons, self.status,
                          self.code])
        self.add_class("tgi-chat")
        self._show_code()
        self._show_exports()
        if isinstance(parameters, ParametersWidget):  # shared by the workbench's chats: let go on close
            parameters.observe(self._show_code, ["params", "system_prompt"])
        replace_in_cell(self)

    # ------------------------------------------------------------------------------------------------ API
    @property
    def busy(self) -> bool:
        """True while a reply streams."""
        return self._worker.busy

    def send(self, text: str) -> "ChatWidget":
        """Start a turn with the user message ``text`` and return at once (the reply streams in a thread).

        Raises ``ValueError`` for an empty message and ``RuntimeError`` while a reply still streams.
        """
        text = (text or "").strip()
        if not text:
            raise ValueError("text: the message is empty")
        with self._lock:
            if self.busy:
                raise RuntimeError("a reply is still streaming: call stop() or wait() first")
            if not self.history:
                self.messages.clear()
                self._turn_starts.clear()
            if self.transcript.entries and self.transcript.entries[-1].get("actions"):
                self.transcript.update_entry(-1, actions=None, notice=None)  # Continue: on the last reply only
            self._turn_starts.append((len(self.transcript.entries), len(self.messages), text))
            self.messages.append({"role": "user", "content": text})
            self.transcript.add("user", text)
            self._start_turn()
        return self

    def stop(self) -> None:
        """Stop the reply now: the stream is closed, so the server aborts the request and frees its KV blocks.
        What arrived so far stays in the chat and in ``messages``."""
        worker = getattr(self, "_worker", None)  # None when __init__ failed (ipywidgets closes in __del__)
        if worker is not None:
            worker.stop()

    def wait(self, timeout: Optional[float] = None) -> "ChatWidget":
        """Block until the current reply ended (scripts and tests; the UI never needs it).

        Raises ``TimeoutError`` after ``timeout`` seconds.
        """
        if not self._worker.wait(timeout):
            raise TimeoutError(f"the reply did not end within timeout={timeout} s")
        return self

    def clear(self) -> None:
        """Forget the conversation (stops a reply in progress)."""
        self.stop()
        self.wait(30)
        with self._lock:
            self.messages.clear()
            self._turn_starts.clear()
            self.transcript.truncate(0)
            self._set_status("")
        self._show_exports()

    def regenerate(self) -> "ChatWidget":
        """Ask again for the last reply (or retry the last prompt after an error)."""
        prompt = self._drop_last_turn()
        if prompt is None:
            raise RuntimeError("nothing to regenerate: send a message first")
        return self.send(prompt)

    def edit_last(self) -> Optional[str]:
        """Take back the last prompt (and its reply) and put it in the input box to edit; returns it."""
        prompt = self._drop_last_turn()
        if prompt is not None:
            self.input.value = prompt
        return prompt

    def continue_reply(self) -> "ChatWidget":
        """Ask for the rest of the last reply (cut by max_tokens): the server continues the assistant message
        where it stopped (tgi_nb and TGI continue a final assistant message), and the text joins the reply.

        Raises ``RuntimeError`` when the conversation does not end with a reply, or while one streams.
        """
        with self._lock:
            if self.busy:
                raise RuntimeError("a reply is still streaming: call stop() or wait() first")
            if not self.messages or self.messages[-1]["role"] != "assistant":
                raise RuntimeError("nothing to continue: the conversation does not end with a reply")
            self.transcript.update_entry(-1, actions=None, notice=None)
            self._start_turn(continued=self.messages[-1]["content"])
        return self

    def export_messages(self) -> list[dict[str, Any]]:
        """The conversation in OpenAI's message format, the system prompt first (what a request sends).

        Example:
            >>> chat = ChatWidget("http://127.0.0.1:9", system_prompt="Be brief.")
            >>> chat.load_messages([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
            >>> [m["role"] for m in chat.export_messages()], chat.to_markdown().splitlines()[0]
            (['system', 'user', 'assistant'], '### system')
        """
        return self._request()[0]

    def to_markdown(self) -> str:
        """The conversation as markdown, a ``### role`` heading per message."""
        return to_markdown(self.export_messages())

    def load_messages(self, messages: list[dict[str, Any]]) -> None:
        """Replace the conversation by ``messages`` (OpenAI's format; a system message becomes this chat's
        system prompt); stops a reply in progress."""
        self.stop()
        self.wait(30)
        with self._lock:
            system = [m["content"] for m in messages if m["role"] == "system"]
            if system:
                self.system_prompt = system[-1]
            self.messages = [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]
            self._turn_starts = []
            self.transcript.truncate(0)
            for m in self.messages:
                if m["role"] == "user":
                    self._turn_starts.append((len(self.transcript.entries), self.messages.index(m), m["content"]))
                self.transcript.add(m["role"], m["content"], markdown=m["role"] == "assistant")
        self._show_code()
        self._show_exports()

    def close(self) -> None:
        """Stop the reply in progress and let go of the parameters widget (which may outlive this chat)."""
        worker = getattr(self, "_worker", None)
        if worker is not None:
            worker.close()
            if isinstance(self.parameters, ParametersWidget):
                self.parameters.unobserve(self._show_code, ["params", "system_prompt"])
        super().close()

    # ------------------------------------------------------------------------------------------------ turns
    def _drop_last_turn(self) -> Optional[str]:
        self.stop()
        self.wait(30)
        with self._lock:
            if not self._turn_starts:
                return None
            transcript_len, messages_len, prompt = self._turn_starts.pop()
            del self.messages[messages_len:]
            self.transcript.truncate(transcript_len)
            return prompt

    def _request(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        if isinstance(self.parameters, ParametersWidget):
            kwargs = self.parameters.create_kwargs()
            system = self.system_prompt if self.system_prompt is not None else self.parameters.system_prompt
        else:
            kwargs = split_openai_kwargs(dict(self.parameters or {}))
            system = self.system_prompt
        messages = ([{"role": "system", "content": system}] if system else []) + list(self.messages)
        return messages, kwargs

    def _start_turn(self, continued: str = "") -> None:
        """Stream a reply to the conversation; ``continued``: the last reply's text, which the new text extends."""
        messages, kwargs = self._request()
        started = time.monotonic()
        self.transcript.start_reply(continued)
        self._set_status("<i>waiting for the first token...</i>")

        def show(text: str, field: str = "content") -> None:
            if self.status.value:
                self._set_status("")
            self.transcript.append(text, field)

        def turn(job: Job) -> None:
            reply = stream_reply(self.target, messages, kwargs, job, show, self.updates_per_second, started)
            self._end_turn(reply, kwargs, continued)

        self._set_busy(True)
        if self._worker.start(turn, on_end=self._turn_ended) is None:  # closed meanwhile
            self._set_busy(False)

    def _end_turn(self, reply: Reply, kwargs: dict[str, Any], continued: str) -> None:
        cut = reply.finish_reason == "length" and reply.error is None and not reply.stopped
        notice = actions = None
        if cut:
            notice = (f"The reply was cut at max_tokens ({kwargs.get('max_tokens', 'the server’s limit')}): "
                      "Continue asks for the rest, or raise max_tokens in the parameters.")
            actions = [["continue", "Continue", "Ask the model to go on from where the reply was cut"]]
        with self._lock:
            stats = reply.show_end(self.transcript, self.target.base_url, prefix=continued,
                                   settings=describe_settings(kwargs), notice=notice, actions=actions)
            if stats["error"] is not None:
                if not continued:
                    del self.messages[-1:]  # the prompt failed: it stays on screen, not in the history
                if reply.status_code == 400 and isinstance(self.parameters, ParametersWidget):
                    self.parameters.show_error(stats["error"])
                self._set_status(f"<span style='color:#b91c1c'>{html.escape(stats['error'])}</span>")
            else:
                if continued:
                    self.messages[-1] = {"role": "assistant", "content": continued + reply.text}
                else:
                    self.messages.append({"role": "assistant", "content": reply.text})
                self._set_status("")
                if isinstance(self.parameters, ParametersWidget):
                    self.parameters.show_error(None)
            self.last_stats = stats
        self._show_exports()

    def _turn_ended(self, error: Optional[BaseException]) -> None:
        # Runs after every turn, before wait() returns: the buttons are right by then.
        if error is not None:  # a bug here, not the server's answer (stream_reply reports those)
            self._set_status(html.escape(describe_error(error)[1]))
        self._set_busy(False)

    # ------------------------------------------------------------------------------------------------ UI
    def _submitted(self, text: str) -> None:
        """Send what the box held (the browser emptied it)."""
        try:
            self.send(text)
        except (ValueError, RuntimeError) as exc:
            self._set_status(html.escape(str(exc)))
            if text.strip() and not self.input.value:
                self.input.value = text  # refused: the text goes back where it was typed

    def _continue_clicked(self, index: int) -> None:
        if index not in (-1, len(self.transcript.entries) - 1):
            self._set_status("Continue works on the last reply only")
            return
        self._guard(self.continue_reply)

    def _imported(self, change: Any) -> None:
        files = list(change["new"] or ())
        if not files:
            return
        item = files[-1]
        try:
            self.load_messages(parse_conversation(bytes(item["content"]).decode("utf-8")))
        except (ValueError, UnicodeDecodeError) as exc:
            self._set_status(f"<span style='color:#b91c1c'>{html.escape(item['name'])}: {html.escape(str(exc))}</span>")
            return
        self._set_status(f"imported {html.escape(item['name'])}: {len(self.messages)} messages")

    def _guard(self, action) -> None:
        # Button handlers run in the kernel's thread: the waits inside are bounded, errors become the status.
        try:
            action()
        except RuntimeError as exc:
            self._set_status(html.escape(str(exc)))

    def _set_busy(self, busy: bool) -> None:
        self.input.ready = not busy
        self.stop_button.disabled = not busy
        for button in (self.regenerate_button, self.edit_button, self.clear_button, self.importer):
            button.disabled = busy

    def _set_status(self, text: str) -> None:
        self.status.value = text

    def _show_code(self, _change: Any = None) -> None:
        messages, kwargs = self._request()
        params = {**{k: v for k, v in kwargs.items() if k != "extra_body"}, **kwargs.get("extra_body", {})}
        code = (f"from openai import OpenAI\nclient = OpenAI(base_url={self.target.base_url or '<endpoint.url>/v1'!r}"
                f" + '/', api_key=token)\n" + python_call(params, "messages", self.target.model))
        self.code.value = (f"<details><summary>Python</summary><pre>{html.escape(code)}</pre></details>")
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
        self.system_line.value = (
            f"<div style='font-size:12px' title='Sent first in every request of this chat'>System prompt: "
            f"<i>{html.escape(system)}</i></div>" if system else
            "<div style='font-size:12px;opacity:0.7'>No system prompt (set one in the parameters)</div>")

    def _show_exports(self) -> None:
        if not self.messages:
            self.exports.value = ""
            return
        self.exports.value = ("<span style='font-size:12px'>Export: "
                              + download_link(json.dumps(self.export_messages(), indent=1, ensure_ascii=False),
                                              "chat.json", "JSON", "application/json", "tgi-chat-export-json")
                              + " · " + download_link(self.to_markdown(), "chat.md", "Markdown", "text/markdown",
                                                      "tgi-chat-export-md") + "</span>")
