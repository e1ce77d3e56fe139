"""One small request must never stall or exhaust the server: the request limits (TGI's names), each refused
before the heavy work it would cause, and what stays in bounds inside (seeds, stop token ids)."""

from __future__ import annotations

import contextlib
import socket
import threading

import httpx
import pytest

from server_fixtures import SlowEngine, client, running_server, wait_until
from server_fixtures import engine, server  # noqa: F401  (module-scoped fixtures)

CHAT = {"model": "tgi", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def http(server):
    with client(server) as c:
        yield c


def openai_error(response: httpx.Response, status: int, param) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    return error["message"]


def test_completions_prompts_and_best_of_are_capped_before_tokenizing(http):
    # 50,000 prompts with best_of 128 is about 200 KB: refused by count, nothing is tokenized
    message = openai_error(http.post("/v1/completions", json={"prompt": ["a"] * 50_000, "best_of": 128}), 400,
                           "prompt")
    assert "max_client_batch_size" in message and "50000" in message
    assert http.post("/v1/completions", json={"prompt": ["a"] * 4, "max_tokens": 1}).status_code == 200
    assert "max_best_of" in openai_error(http.post("/v1/completions", json={"prompt": "a", "best_of": 3}), 400,
                                         "best_of")
    assert http.get("/info").json()["max_client_batch_size"] == 4


def test_stop_sequences_are_capped_on_every_route(http):
    assert "max_stop_sequences" in openai_error(http.post("/v1/chat/completions", json={**CHAT, "stop": list("abcde")}),
                                                400, "stop")
    assert "max_stop_sequences" in openai_error(
        http.post("/v1/completions", json={"prompt": "a", "stop": list("abcde")}), 400, "stop")
    long_stop = "x" * 513
    assert "512 characters" in openai_error(http.post("/v1/chat/completions", json={**CHAT, "stop": long_stop}),
                                            400, "stop")
    r = http.post("/generate", json={"inputs": "a", "parameters": {"stop": [long_stop]}})
    assert r.status_code == 422 and "512 characters" in r.json()["error"]
    assert http.post("/v1/chat/completions", json={**CHAT, "stop": ["a", "b", "c", "x" * 512]}).status_code == 200


def test_seed_beyond_64_bits_and_too_many_stop_token_ids_are_400s(http):
    # torch's generators take 64-bit seeds: a larger one raised inside the engine (a 500, or a 503 clients retry)
    assert "64 bits" in openai_error(http.post("/v1/chat/completions", json={**CHAT, "seed": 2**70}), 400, "seed")
    assert "64 bits" in openai_error(http.post("/v1/completions", json={"prompt": "a", "seed": -2**64}), 400, "seed")
    r = http.post("/generate", json={"inputs": "a", "parameters": {"seed": 2**70, "do_sample": True}})
    assert r.status_code == 422 and "seed" in r.json()["error"]
    assert http.post("/v1/chat/completions", json={**CHAT, "seed": 2**64 - 1}).status_code == 200
    assert "256" in openai_error(http.post("/v1/chat/completions",
                                           json={**CHAT, "stop_token_ids": list(range(300))}), 400, "stop_token_ids")


def test_tokenize_is_capped_by_max_input_tokens(http):
    text = "hello " * 2000                                           # more than the 384 tokens of max_input_tokens
    r = http.post("/tokenize", json={"inputs": text})
    assert r.status_code == 422 and "max_input_tokens" in r.json()["error"]
    r = http.post("/tokenize", json={"prompt": text})
    assert r.status_code == 422 and "max_input_tokens" in r.json()["error"]
    assert len(http.post("/tokenize", json={"inputs": "hello " * 10}).json()) >= 10


def _raw_request(port: int, head: bytes, body: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(head + body)
        chunks = []
        while b"\r\n\r\n" not in b"".join(chunks):
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


def test_payload_limit_refuses_a_large_body_before_reading_it(engine):
    with running_server(engine, payload_limit=1000) as (server, _), client(server) as c:
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}
        r = c.post("/v1/chat/completions", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        assert c.post("/generate", json={"inputs": "x" * 2000}).status_code == 413
        # Headers that announce 10 MB and no body at all: the answer comes without waiting for one
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 10000000\r\n\r\n")
        assert _raw_request(server.port, head).startswith(b"HTTP/1.1 413")
        # A chunked body (no length announced) is cut once it passes the limit
        chunked = c.post("/v1/chat/completions", content=iter([b"{" + b" " * 600, b" " * 600 + b"}"]),
                         headers={"content-type": "application/json"})
        assert chunked.status_code == 413 and "payload-limit" in chunked.json()["error"]["message"]
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200


@contextlib.contextmanager
def long_stream(c: httpx.Client, n: int):
    """A streamed chat request of ``n`` samples in flight (on a slow engine) for the block's duration."""
    done = threading.Event()

    def read() -> None:
        with c.stream("POST", "/v1/chat/completions",
                      json={**CHAT, "max_tokens": 200, "n": n, "stream": True, "ignore_eos": True}) as r:
            for _ in r.iter_lines():
                if done.is_set():
                    break

    worker = threading.Thread(target=read)
    worker.start()
    try:
        yield
    finally:
        done.set()
        worker.join(60)


def test_sequences_in_flight_are_bounded(engine):
    slow = SlowEngine(engine, delay=0.05)
    with running_server(slow, max_concurrent_requests=2, max_client_batch_size=2) as (server, app), \
            client(server) as c:
        ctx = app.state.ctx
        with long_stream(c, n=3):
            assert wait_until(lambda: ctx.sequences_in_flight == 3)
            # 3 of the 4 sequences (max_concurrent_requests x max_client_batch_size) are taken: n=2 waits its turn
            r = c.post("/v1/chat/completions", json={**CHAT, "n": 2})
            assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
            assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
            # more samples than the server ever runs at once: a 400, not a 429 to retry forever
            assert openai_error(c.post("/v1/chat/completions", json={**CHAT, "n": 5}), 400, "n")
        assert wait_until(lambda: ctx.sequences_in_flight == 0 and ctx.in_flight == 0)


def test_a_full_server_refuses_before_the_chat_template_runs(engine):
    slow = SlowEngine(engine, delay=0.05)
    with running_server(slow, max_concurrent_requests=1) as (server, app), client(server) as c:
        with long_stream(c, n=1):
            assert wait_until(lambda: app.state.ctx.in_flight == 1)
            # A prompt over max_input_tokens, which only templating and tokenizing can tell: 429 all the same,
            # since nothing is templated or tokenized while the server is full
            long = {**CHAT, "messages": [{"role": "user", "content": "hello " * 2000}]}
            r = c.post("/v1/chat/completions", json=long)
            assert r.status_code == 429 and "max_concurrent_requests" in r.json()["error"]["message"], r.text
            r = c.post("/v1/responses", json={"model": "tgi", "input": "hello " * 2000})  # the Responses API too
            assert r.status_code == 429 and "max_concurrent_requests" in r.json()["error"]["message"], r.text
