"""``ChatWidget``: a streaming chat through the official ``openai`` client.

A turn runs in a daemon thread: the cell or click that starts it returns at once. Streamed text is coalesced
to about 15 browser updates a second and sent append-only (see ``transcript.py``). Stop closes the HTTP
stream; the server sees the client go away, aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import html
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import ipywidgets as w

from .lifecycle import replace_in_cell
from .parameters import ParametersWidget, python_call, split_openai_kwargs
from .target import Target
from .transcript import Transcript

UPDATES_PER_SECOND = 15  # within 10-20: smooth to the eye, few enough messages for a slow browser or link


@dataclass
class _Turn:
    """One request in flight: the widget's thread, its stream and how it ended."""

    appends_before: int  # the transcript's update count when the turn began: "updates" counts this turn's
    started: float = field(default_factory=time.monotonic)
    stop_requested: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    stream: Any = None
    thread: Optional[threading.Thread] = None


def describe_error(exc: BaseException, base_url: Optional[str] = None) -> tuple[Optional[int], str]:
    """(HTTP status or None, a one-line message) for an error from the openai client.

    Example:
        >>> describe_error(RuntimeError("boom"))
        (None, 'RuntimeError: boom')
    """
    import openai

    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        message = body.get("message") or (body.get("error") or {}).get("message") or exc.message
        return exc.status_code, f"{exc.status_code}: {message}"
    if isinstance(exc, openai.APIConnectionError):
        return None, f"cannot reach {base_url or 'the server'}: {exc.__cause__ or exc}"
    if isinstance(exc, openai.APIError):  # an error event inside a stream that had started
        return None, f"the server stopped the answer: {exc.message}"
    return None, f"{type(exc).__name__}: {exc}"


def format_stats(stats: dict[str, Any]) -> str:
    """The line shown under a reply.

    Example:
        >>> format_stats({"ttft_s": 0.25, "tokens": 12, "tokens_per_s": 30.0, "finish_reason": "stop"})
        'TTFT 0.25 s · 12 tokens · 30.0 tok/s · finish_reason: stop'
    """
    parts = []
    if stats.get("ttft_s") is not None:
        parts.append(f"TTFT {stats['ttft_s']:.2f} s")
    parts.append(f"{stats.get('tokens', 0)} tokens")
    if stats.get("tokens_per_s") is not None:
        parts.append(f"{stats['tokens_per_s']:.1f} tok/s")
    parts.append("stopped" if stats.get("stopped") else f"finish_reason: {stats.get('finish_reason')}")
    return " · ".join(parts)


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
        self.update_interval = 1.0 / updates_per_second
        self.history = history  # False: each prompt is a new conversation (CompareWidget's columns)
        self.messages: list[dict[str, Any]] = []
        self.last_stats: Optional[dict[str, Any]] = None
        self._turn: Optional[_Turn] = None
        self._turn_starts: list[tuple[int, int, str]] = []  # (transcript length, len(messages), prompt)
        self._lock = threading.RLock()

        self.transcript = Transcript()
        self.input = w.Textarea(placeholder="Ask something, then click Send",
                                layout=w.Layout(width="auto", flex="1 1 auto", height="56px"))
        self.input.add_class("tgi-chat-input")
        self.send_button = self._button("Send", "tgi-chat-send", "primary", lambda _: self._send_clicked())
        self.stop_button = self._button("Stop", "tgi-chat-stop", "danger", lambda _: self.stop())
        self.stop_button.disabled = True
        self.regenerate_button = self._button("Regenerate", "tgi-chat-regenerate", "",
                                              lambda _: self._guard(self.regenerate))
        self.edit_button = self._button("Edit last", "tgi-chat-edit", "", lambda _: self._guard(self.edit_last))
        self.clear_button = self._button("Clear", "tgi-chat-clear", "", lambda _: self._guard(self.clear))
        self.status = w.HTML()
        self.status.add_class("tgi-chat-status")
        self.code = w.HTML()
        self.code.add_class("tgi-chat-code")
        buttons = w.HBox([self.send_button, self.stop_button, self.regenerate_button, self.edit_button,
                          self.clear_button])
        super().__init__([w.HTML(f"<b>Chat</b> with <code>{html.escape(self.target.label)}</code>"),
                          self.transcript, w.HBox([self.input]), buttons, self.status, self.code])
        self.add_class("tgi-chat")
        self._show_code()
        if isinstance(parameters, ParametersWidget):
            parameters.observe(lambda _: self._show_code(), "params")
        replace_in_cell(self)

    @staticmethod
    def _button(label: str, css: str, style: str, handler) -> w.Button:
        button = w.Button(description=label, button_style=style, layout=w.Layout(width="auto"))
        button.add_class(css)
        button.on_click(handler)
        return button

    # ------------------------------------------------------------------------------------------------ API
    @property
    def busy(self) -> bool:
        """True while a reply streams."""
        turn = self._turn
        return turn is not None and not turn.done.is_set()

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
        turn = getattr(self, "_turn", None)  # None too when __init__ failed (ipywidgets closes in __del__)
        if turn is None or turn.done.is_set():
            return
        turn.stop_requested.set()
        stream = turn.stream
        if stream is not None:
            _close_quietly(stream)

    def wait(self, timeout: Optional[float] = None) -> "ChatWidget":
        """Block until the current reply ended (scripts and tests; the UI never needs it).

        Raises ``TimeoutError`` after ``timeout`` seconds.
        """
        turn = self._turn
        if turn is not None and not turn.done.wait(timeout):
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
        self.stop()
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
        turn = _Turn(self.transcript.appends_sent)
        self._turn = turn
        self.transcript.start_reply()
        self._set_busy(True)
        self._set_status("<i>waiting for the first token...</i>")
        turn.thread = threading.Thread(target=self._run, args=(turn, messages, kwargs), name="tgi_nb-chat",
                                       daemon=True)
        turn.thread.start()

    def _run(self, turn: _Turn, messages: list[dict[str, Any]], kwargs: dict[str, Any]) -> None:
        sent: list[str] = []      # what the browser shows
        pending: list[str] = []   # arrived, not sent yet (coalescing)
        first_token: Optional[float] = None
        last_flush = 0.0
        finish_reason = usage = error = None
        chunks = 0
        try:
            client = self.target.client()
            turn.stream = client.chat.completions.create(
                model=self.target.model, messages=messages, stream=True, stream_options={"include_usage": True},
                **kwargs)
            if turn.stop_requested.is_set():  # Stop came before the response did
                _close_quietly(turn.stream)
            for chunk in turn.stream:
                if turn.stop_requested.is_set():
                    break
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    if choice.index != 0:
                        continue
                    if choice.delta.content:
                        if first_token is None:
                            first_token = time.monotonic()
                            self._set_status("")
                        pending.append(choice.delta.content)
                        chunks += 1
                    finish_reason = choice.finish_reason or finish_reason
                now = time.monotonic()
                if pending and now - last_flush >= self.update_interval:
                    self._flush(sent, pending)
                    last_flush = now
        except Exception as exc:  # noqa: BLE001 - every failure is shown in the chat, which keeps working
            if not turn.stop_requested.is_set():
                error = exc
        finally:
            if turn.stream is not None:
                _close_quietly(turn.stream)
        stopped = turn.stop_requested.is_set()
        if not stopped:
            self._flush(sent, pending)  # the last few tokens: an ended reply is shown in full
        self._end_turn(turn, "".join(sent), first_token, finish_reason, usage, chunks, error, stopped)

    def _flush(self, sent: list[str], pending: list[str]) -> None:
        if pending:
            text = "".join(pending)
            pending.clear()
            sent.append(text)
            self.transcript.append(text)

    def _end_turn(self, turn: _Turn, text: str, first_token: Optional[float], finish_reason: Optional[str],
                  usage: Any, chunks: int, error: Optional[BaseException], stopped: bool) -> None:
        end = time.monotonic()
        tokens = usage.completion_tokens if usage is not None else chunks
        stats = {
            "ttft_s": None if first_token is None else first_token - turn.started,
            "tokens": tokens,
            "tokens_per_s": tokens / (end - first_token) if first_token and tokens > 1 and end > first_token
            else None,
            "elapsed_s": end - turn.started,
            "finish_reason": None if stopped else finish_reason,
            "stopped": stopped,
            "updates": self.transcript.appends_sent - turn.appends_before,
            "error": None,
        }
        with self._lock:
            if error is not None:
                status, message = describe_error(error, self.target.base_url)
                stats["error"] = message
                del self.messages[-1:]  # the prompt failed: it stays on screen, not in the history
                self.transcript.end_reply(message, role="error")
                if status == 400 and isinstance(self.parameters, ParametersWidget):
                    self.parameters.show_error(message)
                self._set_status(f"<span style='color:#b91c1c'>{html.escape(message)}</span>")
            else:
                self.messages.append({"role": "assistant", "content": text})
                self.transcript.end_reply(text, stats=format_stats(stats))
                self._set_status("")
                if isinstance(self.parameters, ParametersWidget):
                    self.parameters.show_error(None)
            self.last_stats = stats
            self._set_busy(False)
            turn.done.set()

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

    def _show_code(self) -> None:
        messages, kwargs = self._request()
        params = {**{k: v for k, v in kwargs.items() if k != "extra_body"}, **kwargs.get("extra_body", {})}
        code = (f"from openai import OpenAI\nclient = OpenAI(base_url={self.target.base_url or '<endpoint.url>/v1'!r}"
                f" + '/', api_key=token)\n" + python_call(params, "messages", self.target.model))
        self.code.value = (f"<details><summary>Python</summary><pre>{html.escape(code)}</pre></details>")


def _close_quietly(stream: Any) -> None:
    try:
        stream.close()
    except Exception:  # noqa: BLE001 - closing a stream that another thread reads may raise there or here
        pass
