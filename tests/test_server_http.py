"""Raw HTTP against a real server: SSE framing, keep-alives, error shapes and status codes on every kind of
failure, auth, 429, 503 while loading, client disconnects freeing KV blocks, metrics, TGI and tokenizer routes."""

from __future__ import annotations

import json
import re
import threading

import httpx
import pytest

from server_fixtures import (BorrowedEngine, FailingEngine, SlowEngine, client, kv_free, running_server, sse_events,
                             wait_until)
from server_fixtures import engine, served  # noqa: F401  (module-scoped fixtures)
from tgi_nb.server import ServerThread, build_app, ServerSettings

CHAT = {"model": "tgi", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture(scope="module")
def http(served):
    with client(served[0]) as c:
        yield c


def assert_openai_error(response: httpx.Response, status: int, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["param"] == param and (code is None or error["code"] == code)
    return error


def assert_tgi_error(response: httpx.Response, status: int, error_type: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error_type"] == error_type and isinstance(body["error"], str)
    return body


# ---------------------------------------------------------------------------------------------------------
# SSE framing
# ---------------------------------------------------------------------------------------------------------

def test_sse_framing(http):
    with http.stream("POST", "/v1/chat/completions", json={**CHAT, "max_tokens": 4, "stream": True, "n": 2,
                                                            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    blocks = raw.split("\n\n")[:-1]
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks)  # one line per event
    events = sse_events(raw.splitlines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert all("role" not in c["delta"] for c in mine[1:])
        assert [c["finish_reason"] for c in mine].count("length") == 1 and mine[-1]["finish_reason"] == "length"
        assert all(len(c) == 4 for c in mine)  # index, delta, logprobs, finish_reason
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 8
    assert all(len(c["choices"]) == 1 for c in chunks[:-1])


def test_keep_alive_comments(http, served):
    settings = served[1].state.ctx.settings
    before = settings.keep_alive_interval
    settings.keep_alive_interval = 0.001  # shorter than a decode step: comments between tokens
    try:
        with http.stream("POST", "/v1/chat/completions", json={**CHAT, "max_tokens": 8, "stream": True}) as r:
            lines = list(r.iter_lines())
    finally:
        settings.keep_alive_interval = before
    assert ": keep-alive" in lines
    events = sse_events(lines)
    assert events[-1] == "[DONE]" and sum(1 for e in events[:-1] if e["choices"][0]["delta"].get("content")) >= 1


def test_tgi_generate_stream_framing(http):
    parameters = {"max_new_tokens": 4, "details": True, "top_n_tokens": 2}
    with http.stream("POST", "/generate_stream", json={"inputs": "Hello", "parameters": parameters}) as r:
        assert r.status_code == 200
        events = sse_events(list(r.iter_lines()))
    assert "[DONE]" not in events and len(events) == 4
    assert [e["index"] for e in events] == [1, 2, 3, 4]
    assert all(set(e["token"]) == {"id", "text", "logprob", "special"} for e in events)
    assert all(len(e["top_tokens"]) == 2 for e in events)
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    last = events[-1]
    assert last["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert last["details"]["finish_reason"] == "length" and last["details"]["generated_tokens"] == 4
    assert last["details"]["input_length"] == 1


# ---------------------------------------------------------------------------------------------------------
# Error shapes and status codes
# ---------------------------------------------------------------------------------------------------------

def test_validation_errors_openai_shape(http):
    assert_openai_error(http.post("/v1/chat/completions", json={**CHAT, "temperature": 9}), 400, "temperature")
    assert_openai_error(http.post("/v1/chat/completions", json={"model": "x"}), 400, "messages")
    assert_openai_error(http.post("/v1/chat/completions", json={"messages": [{"role": "bot", "content": "x"}]}),
                        400, "messages.0.role")
    assert_openai_error(http.post("/v1/chat/completions", content=b"{not json",
                                  headers={"content-type": "application/json"}), 400)
    assert_openai_error(http.post("/v1/chat/completions", json={**CHAT, "top_logprobs": 2}), 400, "top_logprobs")
    assert_openai_error(http.post("/v1/chat/completions", json={**CHAT, "n": 0}), 400, "n")
    err = assert_openai_error(http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 600}), 400,
                              "max_tokens", "context_length_exceeded")
    assert "512" in err["message"] and "600" in err["message"]
    err = assert_openai_error(http.post("/v1/chat/completions",
                                        json={**CHAT, "max_completion_tokens": 600}), 400,
                              "max_completion_tokens", "context_length_exceeded")
    assert_openai_error(http.post("/v1/completions", json={"prompt": "x", "suffix": "y"}), 400, "suffix")
    assert_openai_error(http.post("/v1/completions", json={"prompt": []}), 400, "prompt")
    assert_openai_error(http.post("/v1/completions", json={"prompt": [10**9]}), 400, "prompt")
    assert_openai_error(http.post("/v1/completions", json={"prompt": "x", "best_of": 2, "stream": True}), 400,
                        "best_of")
    assert_openai_error(http.post("/v1/chat/completions",
                                  json={**CHAT, "response_format": {"type": "xml"}}), 400, "response_format.type")
    assert_openai_error(http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
        400, "messages.0.content.0.type")


LONE = "\ud800"  # a lone surrogate: valid JSON ("\\ud800"), not Unicode text
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONE}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "a" + LONE}]}],
                              "stream": True}, "messages.0.content.0.text"),
    ("/v1/chat/completions", {**CHAT, "stop": ["ok", LONE]}, "stop.1"),
    ("/v1/chat/completions", {**CHAT, "tools": [{**WEATHER_TOOL, "function": {
        **WEATHER_TOOL["function"], "description": LONE}}]}, "tools.0.function.description"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {LONE: {"type": "string"}}}}}},
     "response_format.json_schema.schema.properties.\\ud800"),
    ("/v1/completions", {"prompt": ["fine", "x" + LONE]}, "prompt.1"),
    ("/v1/completions", {"prompt": LONE, "stream": True}, "prompt"),
])
def test_lone_surrogates_are_a_400_naming_the_field_openai(http, engine, path, body, param):
    # httpx would fail to encode the surrogate as UTF-8: json.dumps escapes it, as a JS client's JSON does.
    r = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    error = assert_openai_error(r, 400, param)
    assert "surrogate" in error["message"] and error["message"].startswith(param)
    assert kv_free(engine)


@pytest.mark.parametrize("path, body, param", [
    ("/generate", {"inputs": LONE}, "inputs"),
    ("/generate_stream", {"inputs": "x", "parameters": {"stop": [LONE]}}, "parameters.stop.0"),
    ("/", {"inputs": "x" + LONE, "stream": True}, "inputs"),
    ("/tokenize", {"inputs": LONE}, "inputs"),
    ("/tokenize", {"messages": [{"role": "user", "content": LONE}]}, "messages.0.content"),
    ("/chat_tokenize", {"messages": [{"role": "user", "content": "x"}], "tools": [{**WEATHER_TOOL, "function": {
        **WEATHER_TOOL["function"], "name": LONE}}]}, "tools.0.function.name"),
])
def test_lone_surrogates_are_a_422_naming_the_field_tgi(http, path, body, param):
    r = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    error = assert_tgi_error(r, 422, "validation")
    assert error["error"].startswith(param) and "surrogate" in error["error"]


def test_surrogate_pairs_are_text(http):
    # "\ud83d\ude00" in JSON is one character (an emoji), not two lone surrogates.
    body = json.dumps({**CHAT, "messages": [{"role": "user", "content": "\U0001F600"}], "max_tokens": 2})
    assert "\\ud83d\\ude00" in body
    assert http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"}
                     ).status_code == 200


def test_text_parts_and_developer_role(http):
    r = http.post("/v1/chat/completions", json={"max_tokens": 2, "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]})
    assert r.status_code == 200, r.text


def test_not_found_and_method_errors(http):
    assert_openai_error(http.post("/v1/audio/speech", json={}), 404)
    assert_openai_error(http.get("/v1/models/gpt-4"), 404, "model", "model_not_found")
    assert_tgi_error(http.get("/no/such/route"), 404, "not_found")
    err = assert_openai_error(http.get("/v1/chat/completions"), 405)
    assert "GET" in err["message"]


def test_validation_errors_tgi_shape(http):
    assert_tgi_error(http.post("/generate", json={"inputs": "x", "parameters": {"temperature": 0}}), 422,
                     "validation")
    assert_tgi_error(http.post("/generate", json={"inputs": ""}), 422, "validation")
    assert_tgi_error(http.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 600}}), 422,
                     "validation")
    assert_tgi_error(http.post("/generate", json={"inputs": "x", "parameters": {"top_n_tokens": 6}}), 422,
                     "validation")
    assert_tgi_error(http.post("/generate", json={"inputs": "x", "parameters": {"grammar": {"type": "json",
                                                                                          "value": 3}}}),
                     422, "validation")
    assert_tgi_error(http.post("/generate_stream", json={"inputs": "x", "parameters": {"best_of": 2,
                                                                                       "do_sample": True}}),
                     422, "validation")
    assert_tgi_error(http.post("/generate", json={"inputs": "x", "parameters": {"best_of": 2}}), 422, "validation")
    # Found by the fuzz (tests/api_fuzz.py): an empty conversation was a 500 from the chat template.
    error = assert_tgi_error(http.post("/tokenize", json={"messages": []}), 422, "validation")
    assert error["error"].startswith("messages:")


def test_429_with_retry_after(engine):
    with running_server(SlowEngine(engine), max_concurrent_requests=2) as (server, app), client(server) as http:
        body = {**CHAT, "max_tokens": 100, "stream": True}
        with http.stream("POST", "/v1/chat/completions", json=body) as a, \
                http.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 100, "stream": True}) as b:
            # Keep the line iterators: dropping one closes its connection, which is a disconnect.
            lines_a, lines_b = a.iter_lines(), b.iter_lines()
            next(lines_a), next(lines_b)
            assert app.state.ctx.in_flight == 2
            r = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2})
            error = assert_openai_error(r, 429, None, "rate_limit_exceeded")
            assert error["type"] == "rate_limit_error" and r.headers["retry-after"] == "1"
            r = http.post("/generate", json={"inputs": "x"})
            assert_tgi_error(r, 429, "overloaded")
            assert r.headers["retry-after"] == "1"
            assert http.get("/health").status_code == 200  # the cap concerns generation only
        assert wait_until(lambda: app.state.ctx.in_flight == 0)
        assert http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2}).status_code == 200
        assert "tgi_request_rejected_total 2.0" in http.get("/metrics").text
    assert wait_until(lambda: kv_free(engine))


def test_503_while_loading_then_ready(engine):
    release = threading.Event()

    def factory():
        release.wait(30)
        return BorrowedEngine(engine)

    app = build_app(factory, ServerSettings(model_id="tiny-model"))
    server = ServerThread(app, port=0, graceful_shutdown_timeout=1).start()
    try:
        with client(server) as c:
            health = c.get("/health")
            assert_tgi_error(health, 503, "healthcheck")
            r = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2})
            assert_openai_error(r, 503, None, "model_loading")
            assert r.headers["retry-after"] == "1"
            assert_tgi_error(c.post("/generate", json={"inputs": "x"}), 503, "unhealthy")
            assert c.get("/v1/models").json()["data"][0]["id"] == "tiny-model"  # known before it loads
            assert c.get("/info").json()["model_status"] == "loading"
            release.set()
            assert app.state.holder.wait(30)
            assert c.get("/health").status_code == 200
            assert c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2}).status_code == 200
    finally:
        release.set()
        server.stop()


def test_failed_load_is_reported():
    def factory():
        raise FileNotFoundError("no model at /nowhere")

    app = build_app(factory, ServerSettings(api_key="k"))
    with ServerThread(app, port=0) as server, client(server, api_key="k") as c:
        app.state.holder.wait(10)
        # /health is open to anyone: the failure's text (a local path) is not for them
        body = assert_tgi_error(httpx.get(server.url + "/health"), 503, "healthcheck")
        assert "failed to load" in body["error"] and "nowhere" not in body["error"] and body["status"] == "failed"
        error = assert_openai_error(c.post("/v1/completions", json={"prompt": "x"}), 503, None, "model_load_failed")
        assert "/nowhere" in error["message"]                             # the key holder's routes say why


class _BrokenTokenizer(BorrowedEngine):
    def tokenize(self, *args, **kwargs):
        raise RuntimeError("cannot read /home/alice/.cache/secret-model/tokenizer.json")


def test_unexpected_errors_answer_500_without_their_text(engine, caplog):
    with running_server(_BrokenTokenizer(engine)) as (server, _), client(server) as c:
        with caplog.at_level("ERROR", logger="tgi_nb.server"):
            for path, body in (("/v1/completions", {"prompt": "x", "max_tokens": 1}), ("/generate", {"inputs": "x"})):
                r = c.post(path, json=body)
                assert r.status_code == 500 and "alice" not in r.text and "RuntimeError" not in r.text, r.text
                error_id = re.search(r"error id ([0-9a-f]+)", r.text).group(1)
                assert any(error_id in rec.getMessage() and rec.exc_info for rec in caplog.records)


def test_errors_during_generation(engine):
    failing = FailingEngine(engine, fail_after=2)
    with running_server(failing) as (server, _), client(server) as c:
        r = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 20})
        error = assert_openai_error(r, 500)
        # the engine's text (which can name paths) stays in the log, found there by the error id
        assert error["type"] == "server_error" and "error id" in error["message"]
        assert "simulated" not in error["message"]
        assert_tgi_error(c.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 20}}), 424,
                         "generation")
        with c.stream("POST", "/v1/chat/completions", json={**CHAT, "max_tokens": 20, "stream": True}) as s:
            assert s.status_code == 200
            events = sse_events(list(s.iter_lines()))
        assert "[DONE]" not in events
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert set(events[-1]) == {"error"} and "generation failed (error id" in events[-1]["error"]["message"]
        assert "simulated" not in events[-1]["error"]["message"]
        assert all("error" not in e for e in events[:-1])
        with c.stream("POST", "/generate_stream", json={"inputs": "x", "parameters": {"max_new_tokens": 20}}) as s:
            events = sse_events(list(s.iter_lines()))
        assert events[-1]["error_type"] == "generation" and len(events) == 3
        metrics = c.get("/metrics").text
        assert 'tgi_request_failure_total{err="generation",route="chat_completions"} 2.0' in metrics
    assert wait_until(lambda: kv_free(engine))


# ---------------------------------------------------------------------------------------------------------
# Auth
# ---------------------------------------------------------------------------------------------------------

def test_api_key(engine):
    with running_server(engine, api_key="s3cret") as (server, _):
        routes = [("POST", "/v1/chat/completions", {**CHAT, "max_tokens": 1}), ("GET", "/v1/models", None),
                  ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1}), ("GET", "/info", None),
                  ("POST", "/generate", {"inputs": "x", "parameters": {"max_new_tokens": 1}}),
                  ("GET", "/metrics", None), ("POST", "/tokenize", {"inputs": "x"}), ("GET", "/docs", None),
                  ("GET", "/openapi.json", None), ("POST", "/", {"inputs": "x"})]
        with httpx.Client(base_url=server.url, timeout=30) as anon:
            assert anon.get("/health").status_code == 200
            for method, path, body in routes:
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                                {"Authorization": "Bearer s3cre"}):
                    r = anon.request(method, path, json=body, headers=headers)
                    assert r.status_code == 401, (path, headers)
                    assert r.headers["www-authenticate"] == "Bearer"
                    if path.startswith("/v1"):
                        assert assert_openai_error(r, 401, None, "invalid_api_key")
                    else:
                        assert_tgi_error(r, 401, "authentication")
                r = anon.request(method, path, json=body, headers={"Authorization": "Bearer s3cret"})
                assert r.status_code == 200, (path, r.text)


# ---------------------------------------------------------------------------------------------------------
# Disconnects
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slow_served(engine):
    """A server whose outputs arrive 50 ms apart (per request): 400 tokens would take 20 s or more, so a
    request that ends early was ended by its disconnect, however fast or loaded the machine is."""
    with running_server(SlowEngine(engine)) as (server, app):
        yield server, app


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {**CHAT, "stream": True}),
    ("/v1/completions", {"prompt": ["a", "b"], "n": 2, "stream": True}),
    ("/generate_stream", {"inputs": "x", "parameters": {}}),
])
def test_stream_disconnect_frees_kv(slow_served, engine, path, body):
    if path == "/generate_stream":
        body["parameters"]["max_new_tokens"] = 400
    else:
        body = {**body, "max_tokens": 400, "ignore_eos": True}
    generated_before = engine.stats().generated_tokens_total
    with client(slow_served[0]) as http, http.stream("POST", path, json=body) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert engine.stats().kv_blocks_used > 0
    assert wait_until(lambda: kv_free(engine))
    # Aborted long before 400 tokens each: the blocks were freed on disconnect, not at the end.
    assert engine.stats().generated_tokens_total - generated_before < 200
    assert wait_until(lambda: slow_served[1].state.ctx.in_flight == 0)


def test_non_stream_disconnect_frees_kv(slow_served, engine):
    generated_before = engine.stats().generated_tokens_total
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before the answer could be ready
        httpx.post(slow_served[0].url + "/v1/completions",
                   json={"prompt": "x", "max_tokens": 400, "ignore_eos": True}, timeout=0.3)
    assert wait_until(lambda: kv_free(engine))
    assert engine.stats().generated_tokens_total - generated_before < 300
    assert wait_until(lambda: slow_served[1].state.ctx.in_flight == 0)


# ---------------------------------------------------------------------------------------------------------
# TGI routes, tokenizer routes, info, metrics
# ---------------------------------------------------------------------------------------------------------

def test_generate_details(http, engine):
    r = http.post("/generate", json={"inputs": "Hello world", "parameters": {
        "max_new_tokens": 3, "details": True, "decoder_input_details": True, "top_n_tokens": 2}})
    assert r.status_code == 200 and int(r.headers["x-generated-tokens"]) == 3
    body = r.json()
    details = body["details"]
    assert details["finish_reason"] == "length" and details["generated_tokens"] == 3 and details["seed"] is None
    assert [t["id"] for t in details["prefill"]] == engine.tokenizer.encode("Hello world")
    # as TGI: the first prompt token has no log-probability, the others are scored
    assert details["prefill"][0]["logprob"] is None
    assert all(isinstance(t["logprob"], float) and t["logprob"] <= 0 for t in details["prefill"][1:])
    assert "".join(t["text"] for t in details["tokens"]) == body["generated_text"]
    assert all(len(top) == 2 for top in details["top_tokens"])
    assert details["tokens"][0]["id"] == details["top_tokens"][0][0]["id"]  # greedy: the top token is chosen
    full = http.post("/generate", json={"inputs": "Hello world", "parameters": {"max_new_tokens": 3,
                                                                               "return_full_text": True}}).json()
    assert full["generated_text"] == "Hello world" + body["generated_text"] and "details" not in full
    sampled = http.post("/generate", json={"inputs": "Hi", "parameters": {
        "max_new_tokens": 3, "do_sample": True, "details": True}}).json()["details"]
    again = http.post("/generate", json={"inputs": "Hi", "parameters": {
        "max_new_tokens": 3, "do_sample": True, "details": True, "seed": sampled["seed"]}}).json()["details"]
    assert [t["id"] for t in again["tokens"]] == [t["id"] for t in sampled["tokens"]]  # the seed reproduces
    best = http.post("/generate", json={"inputs": "Hi", "parameters": {
        "max_new_tokens": 3, "best_of": 2, "do_sample": True, "details": True}}).json()["details"]
    assert len(best["best_of_sequences"]) == 1


def test_compat_root_route(http):
    r = http.post("/", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200 and isinstance(r.json(), list) and "generated_text" in r.json()[0]
    with http.stream("POST", "/", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}, "stream": True}) as s:
        events = sse_events(list(s.iter_lines()))
    assert len(events) == 2 and events[-1]["generated_text"] is not None


def test_tokenizer_routes(http, engine):
    ids = engine.tokenizer.encode("Hello world")
    tgi = http.post("/tokenize", json={"inputs": "Hello world"}).json()
    assert [t["id"] for t in tgi] == ids
    assert [(t["start"], t["stop"], t["text"]) for t in tgi] == [(0, 5, "Hello"), (5, 11, " world")]
    vllm = http.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert vllm["tokens"] == ids and vllm["count"] == 2 and vllm["max_model_len"] == 512
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    templated = http.post("/chat_tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert [t["id"] for t in templated["tokenize_response"]] == chat["tokens"]
    assert templated["templated_text"].endswith("<|im_start|>assistant\n")
    assert http.post("/detokenize", json={"tokens": ids}).json() == {"prompt": "Hello world"}
    assert_tgi_error(http.post("/detokenize", json={"tokens": [-1]}), 422, "validation")


def test_info_and_models(http):
    info = http.get("/info").json()
    for key in ("model_id", "max_concurrent_requests", "max_best_of", "max_stop_sequences", "max_input_tokens",
                "max_total_tokens", "version", "router"):
        assert key in info
    assert info["max_input_tokens"] == 384 and info["max_total_tokens"] == 512
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
    assert models["data"][0]["max_model_len"] == 512
    assert http.get("/docs").status_code == 200
    assert "/v1/chat/completions" in http.get("/openapi.json").json()["paths"]


def test_docs_work_offline_from_the_servers_own_files(http):
    """/docs loads nothing from a CDN (the page runs in Jupyter's origin behind jupyter-server-proxy, often
    with no network): every script, style and icon it names is relative, and the server serves it."""
    page = http.get("/docs").text
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page)
    assert any(a.endswith("swagger-ui-bundle.js") for a in assets) and any(a.endswith(".css") for a in assets)
    for asset in assets:
        assert "//" not in asset and not asset.startswith("/"), asset     # relative: works under a proxy prefix
        r = http.get(f"/{asset}")
        assert r.status_code == 200 and len(r.content) > 1000, asset


def test_metrics(http):
    http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3})
    with http.stream("POST", "/v1/chat/completions", json={**CHAT, "max_tokens": 3, "stream": True}) as r:
        r.read()
    http.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}})
    text = http.get("/metrics").text
    for name in ('tgi_request_count_total{route="chat_completions"}', 'tgi_request_success_total{route="generate"}',
                 "tgi_request_failure_total", "tgi_request_duration_seconds_bucket",
                 "tgi_request_queue_duration_seconds", "tgi_request_time_to_first_token_seconds_bucket",
                 "tgi_request_inter_token_latency_seconds_bucket", "tgi_request_input_length_bucket",
                 "tgi_request_generated_tokens_bucket", "tgi_queue_size", "tgi_batch_current_size",
                 "tgi_kv_blocks_used", "tgi_requests_in_flight"):
        assert name in text, name


def test_unknown_fields_are_ignored_and_logged(http, caplog):
    with caplog.at_level("WARNING", logger="tgi_nb.server"):
        r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "best_guess": 1, "model": "whatever"})
        g = http.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 1, "mystery": 2}})
    assert r.status_code == 200 and r.json()["model"] == "tiny" and g.status_code == 200
    messages = " ".join(rec.getMessage() for rec in caplog.records)
    assert "best_guess" in messages and "parameters.mystery" in messages


def test_restart_on_the_same_port(engine):
    app = build_app(engine, ServerSettings())
    first = ServerThread(app, port=0).start()
    port = first.port
    with httpx.Client(base_url=first.url) as c:
        assert c.get("/health").status_code == 200
    first.stop()
    second = ServerThread(app, port=port).start()  # never "address already in use"
    try:
        assert httpx.get(second.url + "/health").status_code == 200
        assert httpx.post(second.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200
    finally:
        second.stop()
    assert engine.stats() is not None  # a given engine is never shut down by the server


def test_shutdown_ends_open_streams_and_frees_kv(engine):
    # Outputs 50 ms apart: the 400-token streams could not end on their own for 20 s, so an end seen here
    # is the shutdown's. Two stoppers race the context manager's exit: stop() must be safe from many threads.
    with running_server(SlowEngine(engine)) as (server, app), client(server) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 400, "ignore_eos": True,
                                                       "stream": True}) as r, \
                c.stream("POST", "/generate_stream", json={"inputs": "x", "parameters": {"max_new_tokens": 400}}) as g:
            openai_lines, tgi_lines = r.iter_lines(), g.iter_lines()
            assert next(openai_lines).startswith("data: ") and next(tgi_lines).startswith("data: ")
            stoppers = [threading.Thread(target=server.stop) for _ in range(2)]
            for stopper in stoppers:
                stopper.start()
            openai_events = sse_events(list(openai_lines))
            tgi_events = sse_events(list(tgi_lines))
            for stopper in stoppers:
                stopper.join(30)
                assert not stopper.is_alive()
            assert not server.is_alive
    # Each stream ends with an error event in its route's shape, not with a clean finish or a cut connection.
    assert openai_events[-1]["error"]["code"] == "shutting_down", openai_events[-1]
    assert all("choices" in e for e in openai_events[:-1]) and "[DONE]" not in openai_events
    assert tgi_events[-1] == {"error": "the server is shutting down", "error_type": "unhealthy"}
    assert all(e["generated_text"] is None for e in tgi_events[:-1])
    assert wait_until(lambda: kv_free(engine))
    assert app.state.holder.status == "stopped"
    server.stop()  # once more, after the fact: a no-op


def test_shutdown_answers_waiting_requests_503(engine):
    with running_server(SlowEngine(engine)) as (server, app), client(server) as c:
        results = []
        request = threading.Thread(target=lambda: results.append(
            c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 400, "ignore_eos": True})))
        request.start()
        assert wait_until(lambda: app.state.ctx.in_flight == 1)
        server.stop()
        request.join(30)
    assert_openai_error(results[0], 503, None, "shutting_down")
    assert wait_until(lambda: kv_free(engine))


def test_root_and_version(http):
    assert http.get("/").status_code == 200  # TGI answers GET / as a health check
    assert http.get("/version").json()["version"]
