"""The Batch API with the official openai SDK against a real server (tiny random llama in float64, so that a
greedy answer does not depend on what else is in the engine's batch): files, batches, output and error files in
OpenAI's line format, limits, cancel, and a batch that outlives its server."""

from __future__ import annotations

import json
import threading

import openai
import pytest

from server_fixtures import BorrowedEngine, GatedEngine, kv_free, make_engine, running_server, wait_until
from server_fixtures import engine64  # noqa: F401  (module-scoped fixture)

MESSAGES = [{"role": "user", "content": "Name three colours."}]
LIMITS = dict(max_file_bytes=16 * 1024, max_batch_requests=40)


@pytest.fixture(scope="module")
def engine(engine64):
    return engine64


@pytest.fixture(scope="module")
def server(engine):
    with running_server(engine, **LIMITS) as (server, app):
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)


def jsonl(lines: list) -> bytes:
    return b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)


def chat_line(custom_id: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tiny", "messages": MESSAGES, "max_tokens": 6, "temperature": 0, **body}}


def start_batch(client, lines: list, endpoint: str = "/v1/chat/completions", **kwargs):
    """Upload ``lines`` and create a batch of them; returns the batch as created."""
    uploaded = client.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h", **kwargs)


def run_batch(client, lines: list, endpoint: str = "/v1/chat/completions"):
    batch = start_batch(client, lines, endpoint, metadata={"job": "test"})
    assert batch.status in ("validating", "in_progress") and batch.request_counts.total == len(
        [line for line in lines if line != b""])
    assert wait_until(lambda: client.batches.retrieve(batch.id).status in ("completed", "failed", "cancelled"),
                      timeout=120)
    return client.batches.retrieve(batch.id)


def read_lines(client, file_id) -> list[dict]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_chat_batch_matches_the_route_and_keeps_bad_lines_apart(client, engine):
    lines = [chat_line("a"), chat_line("b", max_tokens=3), chat_line("bad-temperature", temperature=5),
             b"{this is not json", b"", chat_line("c", seed=7, temperature=0.8),
             {**chat_line("wrong-url"), "url": "/v1/completions"}]
    batch = run_batch(client, lines)
    assert batch.status == "completed" and batch.completed_at and batch.output_file_id and batch.error_file_id
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (6, 3, 3)
    assert batch.model == "tiny" and batch.metadata == {"job": "test"}

    outputs = {o["custom_id"]: o for o in read_lines(client, batch.output_file_id)}
    assert set(outputs) == {"a", "b", "c"}
    for custom_id, line in outputs.items():
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200 and line["response"]["request_id"]
        body = line["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == "tiny"
        # The same request sent to the route: the same answer, since a line goes through the route itself.
        request = next(x for x in lines if isinstance(x, dict) and x["custom_id"] == custom_id)["body"]
        direct = client.chat.completions.create(**request)
        assert body["choices"][0]["message"]["content"] == direct.choices[0].message.content
        assert body["usage"]["completion_tokens"] == direct.usage.completion_tokens
    total_in = sum(o["response"]["body"]["usage"]["prompt_tokens"] for o in outputs.values())
    total_out = sum(o["response"]["body"]["usage"]["completion_tokens"] for o in outputs.values())
    assert (batch.usage.input_tokens, batch.usage.output_tokens) == (total_in, total_out)

    errors = read_lines(client, batch.error_file_id)
    by_id = {e["custom_id"]: e for e in errors}
    refused = by_id["bad-temperature"]["response"]  # the route's own 400, in its own shape
    assert refused["status_code"] == 400 and refused["body"]["error"]["param"] == "temperature"
    assert by_id["bad-temperature"]["error"] is None
    assert by_id[None]["response"] is None and by_id[None]["error"]["code"] == "invalid_request"
    assert "line 4" in by_id[None]["error"]["message"]
    assert by_id["wrong-url"]["error"]["code"] == "invalid_url"
    assert wait_until(lambda: kv_free(engine))


def test_completions_batch(client):
    lines = [{"custom_id": f"p{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "tiny", "prompt": f"Once upon a time {i}", "max_tokens": 4, "temperature": 0}}
             for i in range(5)]
    batch = run_batch(client, lines, endpoint="/v1/completions")
    assert (batch.status, batch.request_counts.completed, batch.error_file_id) == ("completed", 5, None)
    outputs = read_lines(client, batch.output_file_id)
    assert sorted(o["custom_id"] for o in outputs) == [f"p{i}" for i in range(5)]
    assert all(o["response"]["body"]["object"] == "text_completion" for o in outputs)
    with pytest.raises(openai.BadRequestError) as err:
        client.batches.cancel(batch.id)
    assert err.value.body["code"] == "batch_not_cancellable"


def test_responses_batch(client):
    lines = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/responses",
              "body": {"model": "tiny", "input": f"Question {i}?", "max_output_tokens": 4, "temperature": 0}}
             for i in range(2)]
    batch = run_batch(client, lines, endpoint="/v1/responses")
    assert (batch.status, batch.request_counts.completed) == ("completed", 2)
    bodies = [o["response"]["body"] for o in read_lines(client, batch.output_file_id)]
    assert all(b["object"] == "response" and b["output"] for b in bodies)
    assert batch.usage.output_tokens == sum(b["usage"]["output_tokens"] for b in bodies)


def test_embeddings_batch(client):
    lines = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "minilm", "input": text, "encoding_format": "float"}}
             for i, text in enumerate(["The Eiffel Tower is in Paris.", "Photosynthesis needs light."])]
    batch = run_batch(client, lines, endpoint="/v1/embeddings")
    assert (batch.status, batch.request_counts.completed) == ("completed", 2)
    vectors = [o["response"]["body"]["data"][0]["embedding"] for o in read_lines(client, batch.output_file_id)]
    assert [len(v) for v in vectors] == [384, 384]


def test_files_api(client):
    data = jsonl([chat_line("x")])
    uploaded = client.files.create(file=("mine.jsonl", data), purpose="batch")
    assert (uploaded.object, uploaded.bytes, uploaded.filename, uploaded.purpose) == ("file", len(data), "mine.jsonl",
                                                                                      "batch")
    assert client.files.retrieve(uploaded.id).id == uploaded.id
    assert client.files.content(uploaded.id).content == data
    listed = client.files.list(purpose="batch")
    assert uploaded.id in [f.id for f in listed]
    first = client.files.list(limit=1, order="asc")
    assert len(first.data) == 1 and first.has_more
    assert uploaded.id in [f.id for f in client.files.list(limit=1)]  # pages are followed by the SDK
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError) as err:
        client.files.retrieve(uploaded.id)
    assert err.value.body["param"] == "file_id"


def test_limits_and_refusals_in_openai_shape(client):
    with pytest.raises(openai.BadRequestError) as err:  # larger than max_file_bytes
        client.files.create(file=("big.jsonl", b"x" * (LIMITS["max_file_bytes"] + 1)), purpose="batch")
    assert (err.value.body["param"], err.value.body["code"]) == ("file", "file_too_large")
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("a.jsonl", b"{}"), purpose="fine-tune")
    assert err.value.body["param"] == "purpose" and "batch" in err.value.body["message"]

    too_many = client.files.create(file=("many.jsonl", jsonl([chat_line(f"r{i}") for i in range(41)])),
                                   purpose="batch")
    with pytest.raises(openai.BadRequestError) as err:  # more lines than max_batch_requests
        client.batches.create(input_file_id=too_many.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert (err.value.body["param"], err.value.body["code"]) == ("input_file_id", "too_many_requests")
    twice = client.files.create(file=("twice.jsonl", jsonl([chat_line("same"), chat_line("same")])), purpose="batch")
    with pytest.raises(openai.BadRequestError) as err:
        client.batches.create(input_file_id=twice.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert err.value.body["code"] == "duplicate_custom_id" and "lines 1 and 2" in err.value.body["message"]
    for kwargs, param in ((dict(endpoint="/v1/moderations"), "endpoint"), (dict(completion_window="1h"),
                                                                           "completion_window")):
        with pytest.raises(openai.BadRequestError) as err:
            client.batches.create(**{"input_file_id": twice.id, "endpoint": "/v1/chat/completions",
                                     "completion_window": "24h", **kwargs})
        assert err.value.body["param"] == param
    with pytest.raises(openai.NotFoundError) as err:
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    assert err.value.body["param"] == "input_file_id"
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")


def test_cancel_stops_lines_in_flight_and_records_the_rest(engine):
    gated = GatedEngine(engine)
    try:
        with running_server(gated, batch_concurrency=4) as (server, _):
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
            batch = start_batch(client, [chat_line(f"r{i}") for i in range(10)])
            assert wait_until(lambda: gated.submitted == 4)  # batch_concurrency lines in flight, then it waits
            assert client.batches.retrieve(batch.id).status == "in_progress"
            assert client.batches.list().data[0].id == batch.id
            assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
            assert wait_until(lambda: client.batches.retrieve(batch.id).status == "cancelled")
            done = client.batches.retrieve(batch.id)
            assert (done.request_counts.completed, done.request_counts.failed) == (0, 10)
            assert done.output_file_id is None and done.cancelled_at
            errors = read_lines(client, done.error_file_id)
            assert sorted(e["custom_id"] for e in errors) == sorted(f"r{i}" for i in range(10))
            assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
            assert client.batches.cancel(batch.id).status == "cancelled"  # again: nothing left to do
    finally:
        gated.gate.set()
    assert wait_until(lambda: kv_free(engine))


def test_a_batch_past_its_completion_window_expires(engine):
    gated = GatedEngine(engine)
    try:
        with running_server(gated, batch_concurrency=2) as (server, app):
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
            batch = start_batch(client, [chat_line(f"r{i}", max_tokens=2) for i in range(5)])
            assert batch.expires_at == batch.created_at + 24 * 3600
            assert wait_until(lambda: gated.submitted == 2)
            app.state.batches.get(batch.id).expires_at = 0  # the window ends while two lines are in flight
            gated.gate.set()
            assert wait_until(lambda: client.batches.retrieve(batch.id).status == "expired")
            done = client.batches.retrieve(batch.id)
            assert (done.request_counts.completed, done.request_counts.failed) == (2, 3) and done.expired_at
            assert {e["error"]["code"] for e in read_lines(client, done.error_file_id)} == {"batch_expired"}
    finally:
        gated.gate.set()


def test_a_batch_left_running_runs_again_when_the_server_starts_on_its_folder(engine, tmp_path):
    gated = GatedEngine(engine)
    lines = [chat_line(f"r{i}", max_tokens=3) for i in range(3)]
    try:
        with running_server(gated, files_dir=str(tmp_path)) as (server, _):
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
            batch = start_batch(client, lines)
            assert wait_until(lambda: gated.submitted == 3)
    finally:
        gated.gate.set()  # the server stopped first: the lines it dropped are not recorded as failed
    with running_server(BorrowedEngine(engine), files_dir=str(tmp_path)) as (server, _):
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
        assert wait_until(lambda: client.batches.retrieve(batch.id).status == "completed")
        done = client.batches.retrieve(batch.id)
        assert (done.request_counts.completed, done.request_counts.failed) == (3, 0)
        assert len(read_lines(client, done.output_file_id)) == 3


class HeldEngine(BorrowedEngine):
    """The engine, whose first output holds the engine thread until ``gate`` opens, recording each request's
    priority as it is submitted and the priorities in the order requests finish."""

    def __init__(self, engine):
        super().__init__(engine)
        self.gate, self.holding = threading.Event(), threading.Event()
        self.priorities: list[int] = []
        self.finished: list[int] = []

    def add_request(self, prompt, params, request_id=None, on_output=None, priority=0, **kwargs):
        def held(out):
            if not self.holding.is_set():
                self.holding.set()
                self.gate.wait(120)
            if out.finished:
                self.finished.append(priority)
            on_output(out)

        self.priorities.append(priority)
        return self._engine.add_request(prompt, params, request_id, held, priority=priority, **kwargs)


def test_an_interactive_request_is_scheduled_before_the_batch_lines(tiny_model_dir):
    engine = make_engine(tiny_model_dir("llama"), max_num_seqs=1)  # one sequence at a time: an order to see
    held = HeldEngine(engine)
    try:
        with running_server(held, batch_concurrency=3) as (server, _):
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
            batch = start_batch(client, [chat_line(f"r{i}", max_tokens=3) for i in range(3)])
            # The first line runs, held; the other two are queued behind it. Then a user asks something.
            assert wait_until(lambda: held.holding.is_set() and held.priorities == [1, 1, 1])
            answer = {}
            asker = threading.Thread(target=lambda: answer.update(reply=client.chat.completions.create(
                model="tiny", messages=MESSAGES, max_tokens=3)))
            asker.start()
            assert wait_until(lambda: held.priorities == [1, 1, 1, 0])
            held.gate.set()
            asker.join(120)
            assert answer["reply"].choices[0].message.content is not None
            assert wait_until(lambda: client.batches.retrieve(batch.id).status == "completed")
            # The interactive request finished first: the line running gave its seat up, the others waited.
            assert held.finished == [0, 1, 1, 1]
    finally:
        held.gate.set()
        engine.shutdown()
