"""OpenAI's Responses API through real clients (the openai SDK and its stream helper, LangChain's
``ChatOpenAI(use_responses_api=True)``, the Agents SDK) on the tiny random model: answers that must end are
shaped by a grammar (json_schema, forced tool calls), so every test is deterministic."""

from __future__ import annotations

import json
import threading
from typing import Literal

import httpx
import jsonschema
import pytest
from openai import BadRequestError, NotFoundError, OpenAI
from pydantic import BaseModel

from server_fixtures import SlowEngine, kv_free, running_server, wait_until
from server_fixtures import engine, served  # noqa: F401  (module-scoped fixtures)
from tgi_nb.server.responses_store import ResponseStore

WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                  "required": ["city"], "additionalProperties": False}
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": WEATHER_PARAMS, "strict": True}
ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
                 "additionalProperties": False}
ANSWER_FORMAT = {"format": {"type": "json_schema", "name": "answer", "schema": ANSWER_SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def server(served):
    return served[0]


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1/", api_key="-", max_retries=0)


# ----------------------------------------------------------------------------------------------
# create, stream, retrieve
# ----------------------------------------------------------------------------------------------

def test_create_fields_and_incomplete(client):
    response = client.responses.create(model="tgi", input="Hello", instructions="Be brief", max_output_tokens=6,
                                       temperature=0, metadata={"k": "v"})
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].type == "message" and response.output[0].role == "assistant"
    assert response.output_text and response.metadata == {"k": "v"} and response.instructions == "Be brief"
    usage = response.usage
    assert usage.output_tokens == 6 and usage.total_tokens == usage.input_tokens + 6
    assert usage.output_tokens_details.reasoning_tokens == 0


def test_stream_helper_events_and_final_response(client):
    with client.responses.stream(model="tgi", input="Is it sunny?", text=ANSWER_FORMAT, temperature=0,
                                 max_output_tokens=40) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert json.loads(deltas)["answer"] in ("yes", "no") and final.output_text == deltas
    assert final.status == "completed" and final.usage.output_tokens > 0
    stored = client.responses.retrieve(final.id)
    assert stored.status == "completed" and stored.output_text == final.output_text


def test_json_schema_parses(client):
    class Answer(BaseModel):
        answer: Literal["yes", "no"]  # a free string would run to max_output_tokens on a random model

    parsed = client.responses.parse(model="tgi", input="Yes or no?", text_format=Answer, temperature=0,
                                    max_output_tokens=40)
    assert parsed.status == "completed" and parsed.output_parsed.answer
    response = client.responses.create(model="tgi", input="Yes or no?", text=ANSWER_FORMAT, max_output_tokens=40)
    jsonschema.validate(json.loads(response.output_text), ANSWER_SCHEMA)
    obj = client.responses.create(model="tgi", input="JSON please", text={"format": {"type": "json_object"}},
                                  temperature=0, max_output_tokens=200)
    assert obj.status == "completed" and isinstance(json.loads(obj.output_text), dict)


def test_previous_response_id_continues(client):
    first = client.responses.create(model="tgi", input="Remember: blue.", max_output_tokens=5, temperature=0)
    second = client.responses.create(model="tgi", input="What colour?", previous_response_id=first.id,
                                     max_output_tokens=5, temperature=0)
    assert second.previous_response_id == first.id
    # The second prompt holds the first turn (its input and output) before the new input.
    whole = client.responses.create(model="tgi", store=False, max_output_tokens=5, temperature=0, input=[
        {"role": "user", "content": "Remember: blue."}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What colour?"}])
    assert whole.usage.input_tokens == second.usage.input_tokens and whole.output_text == second.output_text
    items = client.responses.input_items.list(second.id)
    assert [i.type for i in items.data] == ["message"] and items.data[0].content[0].text == "What colour?"


def test_function_tool_round_trip(client):
    first = client.responses.create(model="tgi", input="Weather in Paris?", tools=[WEATHER], tool_choice="required",
                                    parallel_tool_calls=False, temperature=0, max_output_tokens=80)
    assert first.status == "completed" and [o.type for o in first.output] == ["function_call"]
    call = first.output[0]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMS)
    second = client.responses.create(
        model="tgi", previous_response_id=first.id, tools=[WEATHER], text=ANSWER_FORMAT, temperature=0,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "21C and sunny"}],
        max_output_tokens=40)
    assert second.status == "completed" and json.loads(second.output_text)["answer"] in ("yes", "no")
    # The same conversation sent whole, without the store, renders the same prompt.
    whole = client.responses.create(
        model="tgi", store=False, tools=[WEATHER], text=ANSWER_FORMAT, temperature=0, max_output_tokens=40,
        input=[{"role": "user", "content": "Weather in Paris?"},
               {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": "21C and sunny"}])
    assert whole.usage.input_tokens == second.usage.input_tokens and whole.output_text == second.output_text
    with pytest.raises(NotFoundError):
        client.responses.retrieve(whole.id)


def test_function_call_streamed(client):
    named = {"type": "function", "name": "get_weather"}
    with client.responses.stream(model="tgi", input="Weather?", tools=[WEATHER], tool_choice=named,
                                 temperature=0, max_output_tokens=80) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert "response.function_call_arguments.delta" in types and "response.function_call_arguments.done" in types
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    call = final.output[0]
    assert call.type == "function_call" and done.arguments == call.arguments and done.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMS)


# ----------------------------------------------------------------------------------------------
# Refusals and unknown ids
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tool", ["web_search", "web_search_preview", "file_search", "code_interpreter"])
def test_builtin_tool_is_400_naming_it(client, tool):
    with pytest.raises(BadRequestError) as info:
        client.responses.create(model="tgi", input="x", tools=[{"type": tool}])
    error = info.value.body
    assert tool in error["message"] and error["param"] == "tools.0.type"


@pytest.mark.parametrize("kwargs, param", [
    ({"background": True}, "background"),
    ({"truncation": "auto"}, "truncation"),
    ({"include": ["file_search_call.results"]}, "include.0"),
    ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice.type"),
    ({"input": [{"type": "input_image", "image_url": "x"}]}, "input.0.type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0.content.0.type"),
    ({"max_output_tokens": 5000}, "max_output_tokens"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}}, "text.format.schema"),
    ({"reasoning": {"effort": "high"}}, "reasoning.effort"),  # this model does not think
])
def test_unsupported_is_400_naming_the_field(client, kwargs, param):
    with pytest.raises(BadRequestError) as info:
        client.responses.create(**{"model": "tgi", "input": "x", **kwargs})
    assert info.value.body["param"] == param, info.value.body


def test_unknown_ids_are_404(client, server):
    with pytest.raises(NotFoundError):
        client.responses.retrieve("resp_unknown")
    with pytest.raises(NotFoundError):
        client.responses.delete("resp_unknown")
    with pytest.raises(NotFoundError):
        client.responses.cancel("resp_unknown")
    with pytest.raises(NotFoundError):
        client.responses.input_items.list("resp_unknown")
    with pytest.raises(NotFoundError) as info:
        client.responses.create(model="tgi", input="x", previous_response_id="resp_unknown")
    assert info.value.body["param"] == "previous_response_id"


def test_delete_and_input_items_pages(client):
    response = client.responses.create(
        model="tgi", max_output_tokens=3, temperature=0,
        input=[{"role": "user", "content": f"message {i}"} for i in range(5)])
    newest_first = client.responses.input_items.list(response.id, limit=2)
    assert [i.content[0].text for i in newest_first.data] == ["message 4", "message 3"] and newest_first.has_more
    every = [i.content[0].text for i in client.responses.input_items.list(response.id, order="asc")]
    assert every == [f"message {i}" for i in range(5)]  # the SDK's pager follows `after` to the end
    client.responses.delete(response.id)
    with pytest.raises(NotFoundError):
        client.responses.retrieve(response.id)


@pytest.fixture(scope="module")
def slow_served(engine):
    """A second server whose outputs come 50 ms apart, so a response is surely still running when cancelled."""
    with running_server(SlowEngine(engine, delay=0.05)) as (server, app):
        yield server, app


def test_cancel_a_streaming_response(slow_served, engine):
    client = OpenAI(base_url=slow_served[0].url + "/v1/", api_key="-", max_retries=0)
    stream = client.responses.create(model="tgi", input="Tell a long story", stream=True, temperature=0,
                                     max_output_tokens=400)
    events = iter(stream)
    created = next(events)
    assert created.type == "response.created"
    response_id = created.response.id
    first_delta = next(e for e in events if e.type == "response.output_text.delta")
    assert first_delta.delta is not None
    cancelled = client.responses.cancel(response_id)
    assert cancelled.status == "cancelled"
    rest = list(events)
    assert rest[-1].type == "response.incomplete" and rest[-1].response.status == "cancelled"
    assert rest[-2].type == "response.output_item.done" and rest[-2].item.status == "incomplete"
    assert client.responses.retrieve(response_id).status == "cancelled"
    assert wait_until(lambda: kv_free(engine))
    with pytest.raises(BadRequestError) as info:
        client.responses.cancel(response_id)
    assert "cancelled" in info.value.body["message"]


def test_cancel_a_response_awaited_elsewhere(slow_served, engine):
    """A non-streamed response cancelled from another connection answers with status cancelled."""
    server, app = slow_served
    store: ResponseStore = app.state.ctx.responses

    def running():
        return [e for e in store if e.response.metadata.get("tag") == "await" and e.cancel is not None]

    with httpx.Client(base_url=server.url, timeout=60) as http:
        result = {}

        def create() -> None:
            result["response"] = http.post("/v1/responses", json={
                "model": "tgi", "input": "A long story", "max_output_tokens": 400, "metadata": {"tag": "await"}})

        thread = threading.Thread(target=create)
        thread.start()
        assert wait_until(lambda: bool(running()))
        response_id = running()[0].response.id
        assert http.post(f"/v1/responses/{response_id}/cancel").json()["status"] == "cancelled"
        thread.join(60)
        assert result["response"].status_code == 200 and result["response"].json()["status"] == "cancelled"
        assert http.delete(f"/v1/responses/{response_id}").json() == {"id": response_id, "object": "response",
                                                                       "deleted": True}
    assert wait_until(lambda: kv_free(engine))


def test_store_bounds():
    now = [0.0]
    store = ResponseStore(max_responses=2, max_age_s=10, clock=lambda: now[0])
    from tgi_nb.server.responses_protocol import ResponseObject
    from tgi_nb.server.responses_store import StoredResponse

    for i in range(3):
        store.put(StoredResponse(ResponseObject(id=f"resp_{i}", created_at=0, model="m"), [], []))
    assert store.find("resp_0") is None and len(store) == 2
    now[0] = 11.0
    assert store.find("resp_2") is None and len(store) == 0


# ----------------------------------------------------------------------------------------------
# LangChain and the Agents SDK
# ----------------------------------------------------------------------------------------------

def test_langchain_chat_openai_responses_api(server):
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="tgi", base_url=server.url + "/v1", api_key="-", use_responses_api=True,
                     temperature=0, max_tokens=8, max_retries=0)
    message = llm.invoke([HumanMessage("Hello")])
    assert message.text and message.response_metadata["id"].startswith("resp_")
    assert message.usage_metadata["output_tokens"] == 8
    chunks = list(llm.stream("Hello"))
    assert "".join(c.text for c in chunks) == message.text  # temperature 0: the same words, streamed
    calling = llm.model_copy(update={"max_tokens": 80}).bind_tools([WEATHER], tool_choice="get_weather")
    answer = calling.invoke("Weather in Paris?")
    call = answer.tool_calls[0]
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], WEATHER_PARAMS)


def test_agents_sdk_runs_an_agent_with_a_function_tool(server):
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    calls = []

    @agents.function_tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:  # a free string never ends on a random model
        """Weather in a city."""
        calls.append(city)
        return "21C and sunny"

    model = agents.OpenAIResponsesModel(model="tgi", openai_client=AsyncOpenAI(base_url=server.url + "/v1/",
                                                                                 api_key="-", max_retries=0))
    agent = agents.Agent(name="weather", instructions="Answer with the weather.", tools=[get_weather], model=model,
                         model_settings=agents.ModelSettings(tool_choice="required", max_tokens=40,
                                                             temperature=0))
    agents.set_tracing_disabled(True)
    result = agents.Runner.run_sync(agent, "Weather in Paris?", max_turns=3)
    assert calls == ["Paris"] or calls == ["Rome"]
    assert isinstance(result.final_output, str) and result.final_output
