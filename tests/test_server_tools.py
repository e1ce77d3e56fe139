"""Tool calling through real clients (openai, LangChain) on the tiny random model: forced calls are valid because
the grammar makes them so; the streaming parser agrees with the whole-output parser on every split."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

from server_fixtures import client, kv_free, make_engine, wait_until
from server_fixtures import server  # noqa: F401  (module-scoped fixtures)
from tgi_nb.server.chat import render_chat
from tgi_nb.server.protocol import ChatMessage
from tgi_nb.server.tool_parser import ToolCallParser, parse_tool_calls
from tgi_nb.server.tools import plan_tools

WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TIME_PARAMS = {"type": "object", "properties": {"zone": {"$ref": "#/$defs/zone"}}, "required": ["zone"],
               "additionalProperties": False, "$defs": {"zone": {"enum": ["UTC", "CET", "PST"]}}}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast for a city",
                                      "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time in a zone",
                                      "parameters": TIME_PARAMS}},
]
SCHEMAS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
MESSAGES = [{"role": "user", "content": "What's the weather in Paris?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    # The tools' description makes prompts of ~350 tokens.
    engine = make_engine(tiny_model_dir("llama"), max_input_tokens=768, max_total_tokens=1024)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def openai_client(server):
    return OpenAI(base_url=server.url + "/v1/", api_key="-", max_retries=0)


def assert_valid_call(call, names=tuple(SCHEMAS)):
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in names
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


# ----------------------------------------------------------------------------------------------
# Forced calls through the openai SDK
# ----------------------------------------------------------------------------------------------

def test_named_tool_choice(openai_client):
    completion = openai_client.chat.completions.create(model="tgi", messages=MESSAGES, tools=TOOLS,
                                                       tool_choice=WEATHER, max_tokens=100, temperature=0)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    assert_valid_call(choice.message.tool_calls[0], ["get_weather"])


def test_required_tool_choice(openai_client):
    completion = openai_client.chat.completions.create(model="tgi", messages=MESSAGES, tools=TOOLS,
                                                       tool_choice="required", parallel_tool_calls=False,
                                                       max_tokens=100, temperature=0)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    assert_valid_call(choice.message.tool_calls[0])
    sampled = openai_client.chat.completions.create(model="tgi", messages=MESSAGES, tools=TOOLS, n=4, seed=3,
                                                    tool_choice="required", max_tokens=150)
    for choice in sampled.choices:
        assert choice.finish_reason in ("tool_calls", "length")
        calls = choice.message.tool_calls if choice.finish_reason == "tool_calls" else choice.message.tool_calls[:-1]
        for call in calls:
            assert_valid_call(call)


def test_streamed_tool_calls_accumulate_to_the_same_calls(openai_client):
    kwargs = dict(model="tgi", messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=200,
                  temperature=0)
    whole = openai_client.chat.completions.create(**kwargs).choices[0]
    chunks = list(openai_client.chat.completions.create(**kwargs, stream=True))
    firsts = {}
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or []:
            assert delta.index is not None
            if delta.id is not None:  # id, type and name only in the first delta of each call
                assert delta.index not in firsts and delta.type == "function" and delta.function.name
                firsts[delta.index] = delta.id
            else:
                assert delta.type is None and delta.function.name is None
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert len(firsts) == len(whole.message.tool_calls)
    # openai-python's own accumulator (what chat.completions.stream() uses) rebuilds the calls.
    with openai_client.chat.completions.stream(**kwargs) as stream:
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls" and not final.message.content
    assert [(c.function.name, c.function.arguments) for c in final.message.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    for call in final.message.tool_calls:
        assert_valid_call(call)


def test_auto_and_none(openai_client):
    # A random model does not write <tool_call>: with "auto" its text is plain content.
    auto = openai_client.chat.completions.create(model="tgi", messages=MESSAGES, tools=TOOLS, max_tokens=8,
                                                 temperature=0).choices[0]
    assert auto.message.tool_calls is None and auto.message.content and auto.finish_reason == "length"
    streamed = "".join(c.choices[0].delta.content or "" for c in openai_client.chat.completions.create(
        model="tgi", messages=MESSAGES, tools=TOOLS, max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == auto.message.content
    plain = openai_client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=8, temperature=0)
    none = openai_client.chat.completions.create(model="tgi", messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                                 max_tokens=8, temperature=0)
    assert none.choices[0].message.content == plain.choices[0].message.content  # tools left out of the prompt


def test_conversation_with_tool_results(openai_client, engine):
    call = openai_client.chat.completions.create(model="tgi", messages=MESSAGES, tools=TOOLS, tool_choice=WEATHER,
                                                 max_tokens=100, temperature=0).choices[0].message
    messages = [*MESSAGES, call.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": "21C, sunny"}]
    answer = openai_client.chat.completions.create(model="tgi", messages=messages, tools=TOOLS, max_tokens=5,
                                                   temperature=0)
    assert answer.choices[0].message.content
    assert wait_until(lambda: kv_free(engine))


def test_tool_errors(server):
    def error(body):
        with client(server) as http:
            r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 5, **body})
        assert r.status_code == 400, r.text
        return r.json()["error"]

    err = error({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_stock"}}})
    assert err["param"] == "tool_choice.function.name" and "get_weather" in err["message"]
    assert error({"tools": TOOLS, "tool_choice": "always"})["param"] == "tool_choice"
    assert error({"tool_choice": "required"})["param"] == "tool_choice"
    assert error({"tools": [{"type": "custom", "custom": {"name": "x"}}]})["param"] == "tools.0.type"
    assert error({"tools": [{"type": "function", "function": {}}]})["param"] == "tools.0.function.name"
    assert error({"tools": [TOOLS[0], TOOLS[0]]})["param"] == "tools.1.function.name"
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "nope"}}}}}
    err = error({"tools": [TOOLS[0], bad], "tool_choice": "required"})
    assert err["param"] == "tools.1.function.parameters" and "nope" in err["message"]


# ----------------------------------------------------------------------------------------------
# LangChain
# ----------------------------------------------------------------------------------------------

class GetWeather(BaseModel):
    """Weather forecast for a city."""

    city: str = Field(max_length=8)  # bounded, so that the random model finishes the string
    unit: Literal["celsius", "fahrenheit"]


class GetTime(BaseModel):
    """Current time in a zone."""

    zone: Literal["UTC", "CET"]


def test_langchain_bind_tools(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="tgi", api_key="-", base_url=server.url + "/v1/", max_tokens=60, temperature=0,
                     max_retries=0)
    message = llm.bind_tools([GetWeather, GetTime], tool_choice="GetWeather").invoke("Weather in Paris?")
    assert [c["name"] for c in message.tool_calls] == ["GetWeather"]
    GetWeather(**message.tool_calls[0]["args"])
    required = llm.bind_tools([GetWeather, GetTime], tool_choice="any", parallel_tool_calls=False)
    message = required.invoke("What time is it?")
    assert len(message.tool_calls) == 1 and message.tool_calls[0]["name"] in ("GetWeather", "GetTime")
    streamed = None
    for chunk in required.stream("What time is it?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == \
        [(c["name"], c["args"]) for c in message.tool_calls]
    assert streamed.response_metadata["finish_reason"] == "tool_calls"


def test_langchain_structured_output(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="tgi", api_key="-", base_url=server.url + "/v1/", max_tokens=60, temperature=0,
                     max_retries=0)
    assert isinstance(llm.with_structured_output(GetWeather, method="json_schema").invoke("Paris?"), GetWeather)
    assert isinstance(llm.with_structured_output(GetTime, method="function_calling").invoke("Time?"), GetTime)


# ----------------------------------------------------------------------------------------------
# Prompting and parsing, without a server
# ----------------------------------------------------------------------------------------------

def test_tools_and_tool_messages_in_a_template_without_tools(engine):
    plan = plan_tools(TOOLS, "auto", None)
    messages = [ChatMessage(**MESSAGES[0]),
                ChatMessage(role="assistant", content=None, tool_calls=[
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]),
                ChatMessage(role="tool", tool_call_id="call_1", content="21C"),
                ChatMessage(role="tool", tool_call_id="call_2", content="sunny")]
    text = render_chat(engine.tokenizer, messages, tools=plan.template_tools, tool_instructions=plan.instructions())
    assert text.startswith("<|im_start|>system\n# Tools") and '"name": "get_time"' in text
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' \
        in text
    assert "<|im_start|>user\n<tool_response>\n21C\n</tool_response>\n<tool_response>\nsunny\n</tool_response>" in text
    none = plan_tools(TOOLS, "none", None)
    assert "# Tools" not in render_chat(engine.tokenizer, messages[:1], tools=none.template_tools,
                                        tool_instructions=none.instructions())


def test_template_with_tools_gets_them_as_they_are(engine):
    template = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}{{ m.role }}:"
                "{% if m.tool_calls %}{{ m.tool_calls[0].function.arguments | tojson }}{% else %}{{ m.content }}"
                "{% endif %};{% endfor %}")
    messages = [ChatMessage(role="user", content="Hi"), ChatMessage(role="assistant", tool_calls=[
        {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}]),
        ChatMessage(role="tool", tool_call_id="c", content="12:00")]
    plan = plan_tools(TOOLS, "auto", None)
    text = render_chat(engine.tokenizer, messages, chat_template=template, tools=plan.template_tools,
                       tool_instructions=plan.instructions(), add_generation_prompt=True)
    assert text == '[get_weather][get_time]user:Hi;assistant:{"zone": "UTC"};tool:12:00;'


OUTPUTS = [
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\\"ris}", "n": [1, {"a": 2}]}}\n'
    '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>',
    '{"name": "get_time", "parameters": {"zone": "CET"}}',
    '```json\n[{"name": "get_time", "arguments": {"zone": "CET"}}, {"name": "get_weather", "arguments": {}}]\n```',
    '<tool_call>\n{"arguments": {"zone": "UTC"}, "name": "get_time"}\n</tool_call>',
    '<tool_call>\n{"name": "get_stock", "arguments": {}}\n</tool_call> and then',
    "Plain text with a < sign and <tool but no call.\n",
    '{"not": "a call"}',
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UT',
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n<tool_c',
]


@pytest.mark.parametrize("output", OUTPUTS)
def test_streaming_parser_agrees_with_whole_parse_at_every_split(output):
    content, calls = parse_tool_calls(output, SCHEMAS)
    for split in range(len(output) + 1):
        parser = ToolCallParser(SCHEMAS)
        pieces = [parser.feed(output[:split]), parser.feed(output[split:]), parser.finish()]
        streamed_content = "".join(text for text, _ in pieces)
        assert streamed_content == (content or "")
        merged = {}
        for _, deltas in pieces:
            for d in deltas:
                entry = merged.setdefault(d["index"], {"name": None, "arguments": ""})
                if "id" in d:
                    assert entry["name"] is None
                    entry["name"] = d["function"]["name"]
                entry["arguments"] += d["function"]["arguments"]
        assert [(m["name"], m["arguments"]) for _, m in sorted(merged.items())] == \
            [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


def test_parser_results():
    content, calls = parse_tool_calls(OUTPUTS[0], SCHEMAS)
    assert content == "Let me check."
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [
        {"city": 'Pa"ris}', "n": [1, {"a": 2}]}, {"zone": "UTC"}]
    assert [c["function"]["name"] for c in parse_tool_calls(OUTPUTS[2], SCHEMAS)[1]] == ["get_time", "get_weather"]
    assert parse_tool_calls(OUTPUTS[3], SCHEMAS)[1][0]["function"]["arguments"] == '{"zone": "UTC"}'
    assert parse_tool_calls(OUTPUTS[4], SCHEMAS) == (OUTPUTS[4], [])          # unknown tool: content
    assert parse_tool_calls(OUTPUTS[5], SCHEMAS) == (OUTPUTS[5], [])          # text kept exactly
    assert parse_tool_calls(OUTPUTS[6], SCHEMAS) == (OUTPUTS[6], [])
    assert parse_tool_calls(OUTPUTS[8], SCHEMAS)[0] is None                  # cut short before a next call
