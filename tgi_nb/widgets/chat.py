"""``ChatWidget``: a streaming chat through the official ``openai`` client.

A turn runs in the widget's :class:`~tgi_nb.widgets.lifecycle.Worker`: the cell or click that starts it returns
at once. Streamed text is coalesced to about 15 browser updates a second and sent append-only (see
``transcript.py``); the stream itself is :func:`~tgi_nb.widgets.streaming.stream_reply`. Stop closes the HTTP
stream; the server sees the client go away, aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import html
import threading
import time
from typing import Any, Optional, Union

import ipywidgets as w

from .controls import button, styled
from .lifecycle import UPDATES_PER_SECOND, Job, Worker, replace_in_cell
from .parameters import ParametersWidget, python_call, split_openai_kwargs
from .streaming import Reply, describe_error, format_stats, stream_reply
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
        self.input = styled(w.Textarea(placeholder="Ask something, then click Send",
                                       layout=w.Layout(width="auto", flex="1 1 auto", height="56px")),
                            "tgi-chat-input")
        self.send_button = button("Send", "tgi-chat-send", self._send_clicked, style="primary")
        self.stop_button = button("Stop", "tgi-chat-stop", self.stop, style="danger")
        self.stop_button.disabled = True
        self.regenerate_button = button("Regenerate", "tgi-chat-regenerate", lambda: self._guard(self.regenerate))
        self.edit_button = button("Edit last", "tgi-chat-edit", lambda: self._guard(self.edit_last))
        self.clear_button = button("Clear", "tgi-chat-clear", lambda: self._guard(self.clear))
        self.status = styled(w.HTML(), "tgi-chat-status")
        self.code = styled(w.HTML(), "tgi-chat-code")
        buttons = w.HBox([self.send_button, self.stop_button, self.regenerate_button, self.edit_button,
                          self.clear_button])
        super().__init__([w.HTML(f"<b>Chat</b> with <code>{html.escape(self.target.label)}</code>"),
                          self.transcript, w.HBox([self.input]), buttons, self.status, self.code])
        self.add_class("tgi-chat")
        self._show_code()
        if isinstance(parameters, ParametersWidget):  # shared by the workbench's chats: let go on close
            parameters.observe(self._show_code, "params")
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

    def close(self) -> None:
        """Stop the reply in progress and let go of the parameters widget (which may outlive this chat)."""
        worker = getattr(self, "_worker", None)
        if worker is not None:
            worker.close()
            if isinstance(self.parameters, ParametersWidget):
                self.parameters.unobserve(self._show_code, "params")
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

    def _start_turn(self) -> None:
        messages, kwargs = self._request()
        started = time.monotonic()
        self.transcript.start_reply()
        self._set_status("<i>waiting for the first token...</i>")

        def show(text: str) -> None:
            if self.status.value:
                self._set_status("")
            self.transcript.append(text)

        def turn(job: Job) -> None:
            reply = stream_reply(self.target, messages, kwargs, job, show, self.updates_per_second, started)
            self._end_turn(reply)

        self._set_busy(True)
        if self._worker.start(turn, on_end=self._turn_ended) is None:  # closed meanwhile
            self._set_busy(False)

    def _end_turn(self, reply: Reply) -> None:
        with self._lock:
            stats = reply.show_end(self.transcript, self.target.base_url)
            if stats["error"] is not None:
                del self.messages[-1:]  # the prompt failed: it stays on screen, not in the history
                if reply.status_code == 400 and isinstance(self.parameters, ParametersWidget):
                    self.parameters.show_error(stats["error"])
                self._set_status(f"<span style='color:#b91c1c'>{html.escape(stats['error'])}</span>")
            else:
                self.messages.append({"role": "assistant", "content": reply.text})
                self._set_status("")
                if isinstance(self.parameters, ParametersWidget):
                    self.parameters.show_error(None)
            self.last_stats = stats

    def _turn_ended(self, error: Optional[BaseException]) -> None:
        # Runs after every turn, before wait() returns: the buttons are right by then.
        if error is not None:  # a bug here, not the server's answer (stream_reply reports those)
            self._set_status(html.escape(describe_error(error)[1]))
        self._set_busy(False)

    # ------------------------------------------------------------------------------------------------ UI
    def _send_clicked(self) -> None:
        text = self.input.value
        try:
            self.send(text)
        except (ValueError, RuntimeError) as exc:
            self._set_status(html.escape(str(exc)))
            return
        self.input.value = ""

    def _guard(self, action) -> None:
        # Button handlers run in the kernel's thread: the waits inside are bounded, errors become the status.
        try:
            action()
        except RuntimeError as exc:
            self._set_status(html.escape(str(exc)))

    def _set_busy(self, busy: bool) -> None:
        self.send_button.disabled = busy
        self.stop_button.disabled = not busy
        for button in (self.regenerate_button, self.edit_button, self.clear_button):
            button.disabled = busy

    def _set_status(self, text: str) -> None:
        self.status.value = text

    def _show_code(self, _change: Any = None) -> None:
        messages, kwargs = self._request()
        params = {**{k: v for k, v in kwargs.items() if k != "extra_body"}, **kwargs.get("extra_body", {})}
        code = (f"from openai import OpenAI\nclient = OpenAI(base_url={self.target.base_url or '<endpoint.url>/v1'!r}"
                f" + '/', api_key=token)\n" + python_call(params, "messages", self.target.model))
        self.code.value = (f"<details><summary>Python</summary><pre>{html.escape(code)}</pre></details>")
