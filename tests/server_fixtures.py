"""Helpers for the server tests: a real engine behind a real uvicorn server on a free port.

Test modules build their engine and server once (module scope) with these helpers; conftest.py provides
the model folders (``tiny_model_dir``, ``smollm2_dir``).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from typing import Any, Callable, Iterator, Optional

import httpx
import pytest

from tgi_nb.engine import EngineConfig, LLMEngine
from tgi_nb.engine.outputs import CompletionDelta, RequestOutput
from tgi_nb.server import ServerSettings, ServerThread, build_app

# Small limits keep prompts and answers short; the tiny model is random, so it rarely stops on its own.
TINY_LIMITS = dict(max_input_tokens=384, max_total_tokens=512)


def make_engine(model_dir, **overrides) -> LLMEngine:
    """An engine on ``model_dir`` with the tests' limits (``overrides`` win)."""
    return LLMEngine(EngineConfig(model_id=str(model_dir), **{**TINY_LIMITS, **overrides}))


@contextlib.contextmanager
def running_server(engine_or_factory: Any, **settings: Any) -> Iterator[tuple[ServerThread, Any]]:
    """Serve ``engine_or_factory`` on 127.0.0.1:<free port> for the duration of the block."""
    settings.setdefault("served_model_name", "tiny")
    app = build_app(engine_or_factory, ServerSettings(**settings))
    server = ServerThread(app, port=0, graceful_shutdown_timeout=1).start()
    try:
        yield server, app
    finally:
        server.stop()


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds passed; returns its last value. The default
    is generous: it returns as soon as the condition holds, and a loaded 2-core machine can be slow."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def listening(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port``."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def kv_free(engine: LLMEngine) -> bool:
    """True once no request holds KV blocks (prefix-cached blocks with no owner count as free)."""
    stats = engine.stats()
    return stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0


def sse_events(lines: list[str]) -> list[Any]:
    """The JSON documents (and the ``[DONE]`` marker) of an SSE body, comments dropped."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


class BorrowedEngine:
    """A shared engine handed to a server factory: the server's shutdown does not stop it."""

    def __init__(self, engine: LLMEngine):
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def shutdown(self) -> None:
        pass


class SlowEngine(BorrowedEngine):
    """A shared engine whose outputs arrive ``delay`` seconds apart (it sleeps in the engine thread), so
    that requests stay in flight long enough to fill the server's queue."""

    def __init__(self, engine: LLMEngine, delay: float = 0.05):
        super().__init__(engine)
        self.delay = delay

    def add_request(self, prompt, params, request_id: Optional[str] = None, on_output=None, **kwargs) -> str:
        def slow(out: RequestOutput) -> None:
            time.sleep(self.delay)
            on_output(out)

        return self._engine.add_request(prompt, params, request_id, slow, **kwargs)


class GatedEngine(BorrowedEngine):
    """A shared engine whose outputs wait for ``gate`` (the engine thread blocks on it): nothing submitted can
    finish before the test opens it; ``submitted`` counts the requests."""

    def __init__(self, engine):
        super().__init__(engine)
        self.gate = threading.Event()
        self.submitted = 0

    def add_request(self, prompt, params, request_id=None, on_output=None, **kwargs):
        def gated(out):
            self.gate.wait()
            on_output(out)

        self.submitted += 1
        return self._engine.add_request(prompt, params, request_id, gated, **kwargs)


class FailingEngine:
    """A real engine whose requests fail after ``fail_after`` outputs, as an engine error would.

    Everything else is the wrapped engine's; the failing request is aborted in the real engine, so
    its KV blocks are freed.
    """

    def __init__(self, engine: LLMEngine, fail_after: int = 2, message: str = "CUDA error: simulated failure"):
        self._engine = engine
        self.fail_after = fail_after
        self.message = message

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def add_request(self, prompt, params, request_id: Optional[str] = None, on_output=None, **kwargs) -> str:
        count = 0
        done = False

        def wrapped(out: RequestOutput) -> None:
            nonlocal count, done
            if done:
                return
            count += 1
            if count > self.fail_after:
                done = True
                self._engine.abort(out.request_id)
                deltas = [CompletionDelta(i, "", [], finish_reason="error") for i in range(params.n)]
                on_output(RequestOutput(out.request_id, out.prompt_token_ids, deltas, True, 0, self.message))
                return
            on_output(out)

        return self._engine.add_request(prompt, params, request_id, wrapped, **kwargs)


def client(server: ServerThread, api_key: Optional[str] = None, timeout: float = 60.0) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=timeout)


# Module-scoped fixtures shared by the server test modules (import them by name): one tiny random llama
# and one server per test module, so modules stay independent while their tests share the set-up cost.
@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """A tiny random llama engine for one test module."""
    engine = make_engine(tiny_model_dir("llama"))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def served(engine):
    """``(server, app)``: a server on a free port in front of the module's ``engine``, and its app."""
    with running_server(engine) as (server, app):
        yield server, app


@pytest.fixture(scope="module")
def engine64(tiny_model_dir):
    """The tiny random llama in float64, for one test module: a greedy answer does not depend on what else is in
    the engine's batch (float32 sums in another order can flip a near tie), so answers can be compared exactly."""
    import torch

    engine = make_engine(tiny_model_dir("llama", dtype=torch.float64), dtype="float64")
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    """A server on a free port in front of the module's ``engine`` (:func:`served` when the app is needed too)."""
    with running_server(engine) as (server, _):
        yield server
