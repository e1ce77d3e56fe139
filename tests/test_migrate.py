"""tgi_nb.migrate against a real server (tiny random llama in float64: a greedy answer does not depend on what
else runs with it) through the official openai client: recording, the workload as a Batch input file,
replaying on two targets, and the report's checks and exports."""

from __future__ import annotations

import base64
import csv
import io
import json
from typing import Literal

import openai
import pytest
from pydantic import BaseModel

from server_fixtures import running_server, wait_until
from server_fixtures import engine64  # noqa: F401  (module-scoped fixture)
from tgi_nb import migrate
from tgi_nb.migrate import Workload, checks

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                                                          "required": ["city"], "additionalProperties": False}}}]


class City(BaseModel):
    name: Literal["Paris", "Rome"]  # a random model's string would run to max_tokens


@pytest.fixture(scope="module")
def server(engine64):
    with running_server(engine64) as (server, _):
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def openai_code(client) -> dict:
    """Code written for OpenAI (here against the local server): what it got back, by call."""
    got = {}
    got["chat"] = client.chat.completions.create(model="gpt-4o-mini", messages=user("Hi"), max_tokens=6,
                                                 temperature=0).choices[0].message.content
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=user("Tell a story"), max_tokens=6,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    got["stream"] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    got["parse"] = client.chat.completions.parse(model="gpt-4o-mini", messages=user("A city?"), max_tokens=30,
                                                 temperature=0, response_format=City).choices[0].message.content
    got["tools"] = client.chat.completions.create(model="gpt-4o-mini", messages=user("Weather in Paris?"),
                                                  tools=TOOLS, tool_choice="required", max_tokens=40,
                                                  temperature=0).choices[0].message.tool_calls[0].function.name
    got["completion"] = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once upon", max_tokens=5,
                                                  temperature=0).choices[0].text
    got["embedding"] = len(client.embeddings.create(model="text-embedding-3-small", input="hello").data[0].embedding)
    got["response"] = client.responses.create(model="gpt-4o-mini", input="Hi", max_output_tokens=5,
                                              temperature=0).output_text
    events = list(client.responses.create(model="gpt-4o-mini", input="Hello", max_output_tokens=5, temperature=0,
                                          stream=True))
    got["response_stream"] = events[-1].response.output_text   # response.incomplete: it ran out of tokens
    client.models.list()  # not a workload route: not recorded
    return got


def test_record_writes_a_batch_input_file_with_the_answers(client, tmp_path):
    path = tmp_path / "workload.jsonl"
    with migrate.record(client, path) as recording:
        got = openai_code(recording)
    workload = Workload.load(path)
    assert [item.url for item in workload] == (["/v1/chat/completions"] * 4 + ["/v1/completions", "/v1/embeddings"]
                                               + ["/v1/responses"] * 2)
    assert [item.custom_id for item in workload] == [f"request-{i}" for i in range(1, 9)]
    chat, streamed, parsed, tools, completion, embedding, response, response_stream = workload
    assert chat.body == {"model": "gpt-4o-mini", "messages": user("Hi"), "max_tokens": 6, "temperature": 0}
    assert chat.reference["choices"][0]["message"]["content"] == got["chat"] and chat.reference_status == 200
    # A streamed call is kept as the request a Batch line can hold, with the answer its chunks add up to.
    assert "stream" not in streamed.body and "stream_options" not in streamed.body
    assert streamed.reference["choices"][0]["message"]["content"] == got["stream"]
    assert streamed.reference["usage"]["completion_tokens"] >= 1
    # What the SDK really sent: .parse() turned the pydantic model into a JSON schema.
    assert parsed.body["response_format"]["type"] == "json_schema"
    assert parsed.reference["choices"][0]["message"]["content"] == got["parse"]
    assert tools.reference["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == got["tools"]
    assert completion.reference["choices"][0]["text"] == got["completion"]
    # The SDK asks for base64 vectors (and decodes them): the request and answer are kept as they went.
    assert embedding.body["encoding_format"] == "base64"
    assert len(base64.b64decode(embedding.reference["data"][0]["embedding"])) == 4 * got["embedding"]
    assert checks.answer_text("/v1/responses", response.reference) == got["response"]
    # A streamed Responses call is kept as the response its response.completed event carried.
    assert "stream" not in response_stream.body
    assert checks.answer_text("/v1/responses", response_stream.reference) == got["response_stream"]

    # The file is a Batch input file as it is: tgi_nb's Batch API runs it.
    batch = client.batches.create(input_file_id=client.files.create(file=path.open("rb"), purpose="batch").id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
    assert wait_until(lambda: client.batches.retrieve(batch.id).status == "completed", timeout=120)
    done = client.batches.retrieve(batch.id)
    assert (done.request_counts.completed, done.request_counts.failed) == (4, 4)  # four lines are for other routes


def test_replay_reports_what_changed(server, client, tmp_path):
    path = tmp_path / "workload.jsonl"
    with migrate.record(client, path) as recording:
        openai_code(recording)
    workload = Workload.load(path)
    # Parameters this server refuses (suffix: a 400 naming it) and does not know (frobnicate).
    workload.items.append(migrate.WorkItem("refused", "/v1/completions",
                                           {"model": "m", "prompt": "Hello", "suffix": "!", "max_tokens": 3,
                                            "temperature": 0}))
    workload.items.append(migrate.WorkItem("unknown", "/v1/chat/completions",
                                           {"model": "m", "messages": user("Hi"), "max_tokens": 3, "frobnicate": 1,
                                            "n": 2, "temperature": 0}))
    seen = []
    replay = migrate.Replay(workload, [server.url, (client, {"temperature": 1.0, "seed": 3})], concurrency=3)
    report = replay.run(on_outcome=seen.append)
    assert replay.done == replay.total == len(seen) == 2 * len(workload) == len(report.outcomes)
    assert report.reference_label == "the recorded answers"
    same, other = report.targets
    assert other.endswith("(temperature=1.0, seed=3)")

    by = {(o.custom_id, o.target): o for o in report.outcomes}
    for item in workload:
        if item.url != "/v1/embeddings" and item.reference is not None:
            # The same server at the recorded (greedy) settings: the same answers, exactly.
            assert by[(item.custom_id, same)].exact_match is True, item.custom_id
            assert by[(item.custom_id, same)].similarity == pytest.approx(1.0, abs=1e-3)
            assert by[(item.custom_id, other)].exact_match is None  # sampled: not deterministic
    refused = by[("refused", same)]
    assert refused.ok and refused.refused == ["suffix"] and "suffix" not in refused.request
    unknown = by[("unknown", same)]
    assert "frobnicate" in unknown.ignored and "n" not in unknown.ignored
    parsed = by[("request-3", same)]
    assert (parsed.json_valid, parsed.schema_valid) == (True, True)
    assert by[("request-4", same)].tool_calls_valid is True and by[("request-4", same)].finish_reason == "tool_calls"
    assert by[("request-6", same)].text is None and by[("request-6", same)].ok  # an embedding has no text

    summary = {row["target"]: row for row in report.summary()}
    assert summary[same]["requests"] == len(workload) and summary[same]["errors"] == 0
    assert summary[same]["refused"] == "suffix x1" and "frobnicate x1" in summary[same]["ignored"]
    assert summary[same]["exact_match"] == "7/7" and summary[same]["similarity_mean"] == pytest.approx(1.0, abs=1e-3)

    side_by_side = report.request("request-1")
    assert set(side_by_side) == {same, other}
    markdown = report.to_markdown()
    assert markdown.count("| request-1 |") == 2 and "reference: the recorded answers" in markdown
    rows = list(csv.DictReader(io.StringIO(report.to_csv(tmp_path / "report.csv"))))
    assert len(rows) == len(report.outcomes) and (tmp_path / "report.csv").exists()
    assert json.loads(report.to_json())["targets"] == report.targets

    import matplotlib

    matplotlib.use("Agg")
    assert len(report.plot().axes) == 3


def test_replay_without_recorded_answers_compares_with_the_first_target(server):
    workload = Workload.of([{"messages": user("Hi"), "max_tokens": 4, "temperature": 0},
                            {"prompt": "Once upon", "max_tokens": 4, "temperature": 0}])
    report = migrate.replay(workload, [server.url, server.url], similarity_with=False)
    first, second = report.targets
    assert report.reference_label == f"the first target ({first})" and second == f"{first} #2"
    assert all(o.exact_match is None for o in report.outcomes if o.target == first)
    assert all(o.exact_match is True and o.similarity is None for o in report.outcomes if o.target == second)


def test_unreachable_target_and_bad_inputs(tmp_path):
    report = migrate.replay([{"messages": user("Hi")}], "http://127.0.0.1:9", similarity_with=False, timeout=5)
    (outcome,) = report.outcomes
    assert outcome.status is None and "Connection" in outcome.error and report.summary()[0]["errors"] == 1
    with pytest.raises(ValueError, match="url must be one of"):
        Workload.of([{"custom_id": "a", "url": "/v1/images", "body": {}}])
    with pytest.raises(ValueError, match="messages"):
        Workload.of([{"input": "x"}])
    with pytest.raises(TypeError, match="openai.OpenAI"):
        migrate.record("not a client")
    with pytest.raises(TypeError, match="target"):
        migrate.replay([{"messages": user("Hi")}], 42)
