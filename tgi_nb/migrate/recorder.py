"""Recording what code written for OpenAI sends: :func:`record` wraps an ``openai.OpenAI`` client.

The recording client is the same client (base URL, key, timeouts, retries, and the HTTP client it was given)
with one more layer under it that copies each request to the routes of :data:`~tgi_nb.migrate.workload.ENDPOINTS`
and its answer as they go by: the request body exactly as the SDK sent it (after ``.parse()`` turned a pydantic
``response_format`` into a JSON schema, ``extra_body`` merged in, ...), and the answer it really got (from
OpenAI when the client points at OpenAI: the reference a replay compares with). A streamed answer is rebuilt
into the response a non-streamed request would have got. Nothing is changed on the way.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import httpx

from .workload import ENDPOINTS, WorkItem, Workload, responses_path

# Fields that only shape how an answer travels: a Batch line cannot stream, and the answer is kept whole.
_TRANSPORT_FIELDS = ("stream", "stream_options")


def endpoint_of(url: httpx.URL) -> Optional[str]:
    """The workload route a request URL goes to (whatever prefix the base URL has), or None.

    Example:
        >>> endpoint_of(httpx.URL("https://api.openai.com/v1/chat/completions"))
        '/v1/chat/completions'
        >>> endpoint_of(httpx.URL("http://h/user/a/proxy/8080/v1/completions")), endpoint_of(httpx.URL("http://h/v1/models"))
        ('/v1/completions', None)
    """
    path = url.path.rstrip("/")
    # ENDPOINTS lists /v1/chat/completions before /v1/completions, whose suffix it also ends with.
    return next((e for e in ENDPOINTS if path.endswith(e[len("/v1"):])), None)


def assemble_stream(endpoint: str, raw: bytes) -> Optional[dict[str, Any]]:
    """The response a streamed answer (server-sent events) adds up to: a ``chat.completion`` from its chunks,
    a ``text_completion``, or the response of the Responses API's last event (``response.completed``, or
    ``response.incomplete`` when it ran out of ``max_output_tokens``, or ``response.failed``).

    Example:
        >>> sse = (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":'
        ...        b'[{"index":0,"delta":{"role":"assistant","content":"Hel"}}]}\\n\\n'
        ...        b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":'
        ...        b'[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}]}\\n\\ndata: [DONE]\\n\\n')
        >>> assemble_stream("/v1/chat/completions", sse)["choices"][0]["message"]["content"]
        'Hello'
    """
    events = []
    for line in raw.decode("utf-8", "replace").splitlines():
        if line.startswith("data:") and line[5:].strip() not in ("", "[DONE]"):
            try:
                events.append(json.loads(line[5:]))
            except ValueError:
                return None
    if endpoint == "/v1/responses":
        done = [e for e in events if e.get("type") in ("response.completed", "response.incomplete", "response.failed")]
        return done[-1].get("response") if done else None
    if not events:
        return None
    first, choices, usage = events[0], {}, None
    for event in events:
        usage = event.get("usage") or usage
        for c in event.get("choices") or []:
            choice = choices.setdefault(c.get("index", 0), {"index": c.get("index", 0), "finish_reason": None,
                                                             "text": "", "tool_calls": {}})
            choice["finish_reason"] = c.get("finish_reason") or choice["finish_reason"]
            delta = c.get("delta") or {}
            choice["text"] += delta.get("content") or c.get("text") or ""
            for call in delta.get("tool_calls") or []:
                merged = choice["tool_calls"].setdefault(call.get("index", 0), {"id": None, "type": "function",
                                                                                "function": {"name": "", "arguments": ""}})
                merged["id"] = call.get("id") or merged["id"]
                function = call.get("function") or {}
                merged["function"]["name"] += function.get("name") or ""
                merged["function"]["arguments"] += function.get("arguments") or ""
    chat = endpoint == "/v1/chat/completions"
    out = {"id": first.get("id"), "object": "chat.completion" if chat else "text_completion",
           "created": first.get("created"), "model": first.get("model"), "usage": usage, "choices": []}
    for index in sorted(choices):
        c = choices[index]
        if chat:
            calls = [c["tool_calls"][i] for i in sorted(c["tool_calls"])] or None
            message = {"role": "assistant", "content": c["text"] or (None if calls else ""), "tool_calls": calls}
            out["choices"].append({"index": index, "message": message, "finish_reason": c["finish_reason"]})
        else:
            out["choices"].append({"index": index, "text": c["text"], "finish_reason": c["finish_reason"]})
    return out


class _Tee(httpx.SyncByteStream):
    """A response body passed on unchanged while a copy is kept; ``on_done`` gets the copy when it is closed."""

    def __init__(self, stream: Any, on_done: Callable[[bytes], None]):
        self._stream, self._on_done, self._chunks = stream, on_done, []

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._stream:
            self._chunks.append(chunk)
            yield chunk

    def close(self) -> None:
        self._stream.close()
        self._on_done(b"".join(self._chunks))


class _RecordingTransport(httpx.BaseTransport):
    """Sends each request through the client's own HTTP client and records the workload routes' traffic."""

    def __init__(self, inner: httpx.Client, recorder: "Recorder"):
        self.inner, self.recorder = inner, recorder

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.send(request, stream=True)
        endpoint = endpoint_of(request.url)
        if request.method != "POST" or endpoint is None:
            return response
        try:
            body = json.loads(request.content)
        except ValueError:
            return response
        status, headers = response.status_code, response.headers

        def done(raw: bytes) -> None:
            decoded = httpx.Response(status, headers=headers, content=raw)  # undoes a content-encoding
            try:
                answer = decoded.json()
            except ValueError:
                answer = assemble_stream(endpoint, decoded.content)
            self.recorder.add(endpoint, body, status, answer, headers.get("x-request-id", ""))

        return httpx.Response(status, headers=headers, stream=_Tee(response.stream, done), request=request,
                              extensions=response.extensions)


class Recorder:
    """What :func:`record` returns: ``client`` to hand to the code, ``workload`` as it grows, and the files it
    writes as requests finish (``path`` and its ``.responses.jsonl``). Also a context manager giving ``client``.
    """

    def __init__(self, client: Any, path: Union[None, str, Path] = None):
        import openai

        if not isinstance(client, openai.OpenAI):
            raise TypeError(f"client: expected an openai.OpenAI client, got {type(client).__name__}")
        # The SDK's own HTTP client (private, stable across openai 1.x and 2.x), so that a proxy, a custom
        # transport or certificates the user gave it keep working under the recording layer.
        inner = getattr(client, "_client", None) or httpx.Client()
        self.client = client.with_options(http_client=httpx.Client(transport=_RecordingTransport(inner, self),
                                                                   timeout=inner.timeout))
        self.workload = Workload()
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        if self.path is not None:
            self.path.write_text("")
            responses_path(self.path).write_text("")

    def add(self, endpoint: str, body: dict[str, Any], status: int, answer: Any, request_id: str) -> None:
        """Record one request and its answer (called as the answer is read)."""
        body = {k: v for k, v in body.items() if k not in _TRANSPORT_FIELDS}
        with self._lock:
            item = WorkItem(f"request-{len(self.workload) + 1}", endpoint, body, answer, status)
            self.workload.items.append(item)
            if self.path is not None:
                with open(self.path, "a") as f:
                    f.write(json.dumps(item.batch_line()) + "\n")
                with open(responses_path(self.path), "a") as f:
                    f.write(json.dumps({"id": f"batch_req_{item.custom_id}", "custom_id": item.custom_id,
                                        "response": {"status_code": status, "request_id": request_id,
                                                     "body": answer}, "error": None}) + "\n")

    def __enter__(self) -> Any:
        return self.client

    def __exit__(self, *exc: Any) -> None:
        self.client.close()


def record(client: Any, path: Union[None, str, Path] = None) -> Recorder:
    """Record the requests made through ``client`` (an ``openai.OpenAI``) and the answers they get.

    Code written for OpenAI runs unchanged on ``recorder.client``; each chat completion, completion, embedding
    and Responses API call is kept in ``recorder.workload`` and, with ``path``, appended to a Batch input file
    (its answers to ``<name>.responses.jsonl``) that :func:`~tgi_nb.migrate.replay` and the Batch API read.

    Example:
        >>> from openai import OpenAI
        >>> with record(OpenAI(), "workload.jsonl") as client:                          # doctest: +SKIP
        ...     client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
        >>> Workload.load("workload.jsonl")[0].reference["choices"][0]["message"]       # doctest: +SKIP
    """
    return Recorder(client, path)
