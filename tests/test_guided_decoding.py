"""Grammar-constrained decoding: the engine's per-sample grammar processors, and response_format / TGI grammar
through real clients. The tiny model is random, so every valid output below is the grammar's doing."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

from server_fixtures import client, kv_free, make_engine, running_server, sse_events, wait_until
from server_fixtures import engine, server  # noqa: F401  (module-scoped fixtures)
from tgi_nb.engine import SamplingParams, ValidationError
from tgi_nb.engine.guided_decoding import (GrammarCompiler, GrammarError, choice_grammar, json_schema_grammar,
                                           lark_grammar, regex_grammar)

MESSAGES = [{"role": "user", "content": "Describe a city as JSON."}]

# Every string, number and list is bounded, so a random model finishes within a few dozen tokens.
CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "population": {"type": "integer", "minimum": 0, "maximum": 99999},
        "capital": {"type": "boolean"},
        "climate": {"enum": ["dry", "wet", "cold"]},
        "districts": {"type": "array", "items": {"$ref": "#/$defs/district"}, "maxItems": 2},
    },
    "required": ["name", "population", "capital", "climate", "districts"],
    "additionalProperties": False,
    "$defs": {"district": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}$"}},
                           "required": ["code"], "additionalProperties": False}},
}
PHONE = r"\(\d{3}\) \d{3}-\d{4}"


@pytest.fixture(scope="module")
def compiler(engine):
    return GrammarCompiler.for_tokenizer(engine.tokenizer, engine.vocab_size, engine.eos_token_ids)


@pytest.fixture(scope="module")
def openai_client(server):
    return OpenAI(base_url=server.url + "/v1/", api_key="-", max_retries=0)


@pytest.fixture(scope="module")
def http(server):
    with client(server) as c:
        yield c


# ----------------------------------------------------------------------------------------------
# Engine level
# ----------------------------------------------------------------------------------------------

def test_grammars_compile_and_match(compiler):
    city = compiler.compile(json_schema_grammar(CITY_SCHEMA))
    assert city.matches('{"name": "Oslo", "population": 7, "capital": true, "climate": "cold", '
                        '"districts": [{"code": "AB"}]}')
    assert not city.matches('{"name": "Oslo"}')
    assert not city.matches('{"name":"Oslo","population":7,"capital":true,"climate":"cold","districts":[]}')
    assert compiler.compile(json_schema_grammar(CITY_SCHEMA)) is city  # cached
    assert compiler.compile(regex_grammar(PHONE)).matches("(555) 123-4567")
    assert compiler.compile(choice_grammar(["yes", "no"])).matches("no")
    assert compiler.compile(lark_grammar('start: "a"+ "b"')).matches("aaab")
    for bad in (json_schema_grammar({"type": "city"}), regex_grammar("[a-"), lark_grammar("start: undefined_rule")):
        with pytest.raises(GrammarError):
            compiler.compile(bad)


def test_engine_output_follows_grammar_and_stops(engine, compiler):
    grammar = compiler.compile(regex_grammar(PHONE))
    out = engine.generate_sync("Call me at", SamplingParams(max_new_tokens=50, temperature=0,
                                                             logits_processor_factory=grammar.processor)).outputs[0]
    assert re.fullmatch(PHONE, out.text), out.text
    # Complete grammar: only EOS was left, so the sample ended on its own well before max_new_tokens.
    assert out.finish_reason == "stop" and out.token_ids[-1] in engine.eos_token_ids


def test_each_sample_has_its_own_grammar_state(engine, compiler):
    calls = []

    def factory():
        calls.append(1)
        return compiler.compile(lark_grammar('start: ("cat" | "dog" | "bird") (" " ("cat" | "dog" | "bird")){0,3}')
                                ).processor()

    result = engine.generate_sync("Animals:", SamplingParams(max_new_tokens=30, temperature=1.0, seed=7, n=6,
                                                             logits_processor_factory=factory))
    texts = [o.text for o in result.outputs]
    assert len(calls) == 6
    assert all(re.fullmatch(r"(cat|dog|bird)( (cat|dog|bird)){0,3}", t) for t in texts), texts
    assert len(set(texts)) > 1  # samples diverged, and each one's matcher followed its own tokens
    with pytest.raises(ValidationError, match="logits_processor_factory"):
        SamplingParams(logits_processor=lambda ids, logits: logits, logits_processor_factory=factory)


# ----------------------------------------------------------------------------------------------
# OpenAI response_format
# ----------------------------------------------------------------------------------------------

def test_json_schema_response_format(openai_client):
    response_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA, "strict": True}}
    completion = openai_client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=200, temperature=0,
                                                       response_format=response_format)
    choice = completion.choices[0]
    jsonschema.validate(json.loads(choice.message.content), CITY_SCHEMA)
    assert choice.finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in openai_client.chat.completions.create(
        model="tgi", messages=MESSAGES, max_tokens=200, temperature=0, response_format=response_format, stream=True)
        if c.choices)
    assert streamed == choice.message.content
    sampled = openai_client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=200, n=3, seed=1,
                                                    response_format=response_format)
    for c in sampled.choices:
        jsonschema.validate(json.loads(c.message.content), CITY_SCHEMA)


class Answer(BaseModel):
    verdict: Literal["yes", "no", "maybe"]
    confidence: int = Field(ge=0, le=10)
    reason: str = Field(max_length=15)


def test_openai_parse_with_pydantic(openai_client):
    completion = openai_client.chat.completions.parse(model="tgi", messages=MESSAGES, max_tokens=100, temperature=0,
                                                      response_format=Answer)
    assert isinstance(completion.choices[0].message.parsed, Answer)


def test_json_object_and_tgi_json_format(openai_client, engine):
    # A random model writes endless strings in free JSON; biased towards "{}" it closes the object at once,
    # the grammar (applied after the bias) keeps every other token valid, and EOS ends it.
    empty = engine.tokenizer.convert_tokens_to_ids("{}")
    completion = openai_client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=50, temperature=0,
                                                       response_format={"type": "json_object"},
                                                       logit_bias={str(empty): 100})
    assert json.loads(completion.choices[0].message.content) == {}
    assert completion.choices[0].finish_reason == "stop"
    completion = openai_client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=200, temperature=0,
                                                       extra_body={"response_format": {"type": "json",
                                                                                       "value": CITY_SCHEMA}})
    jsonschema.validate(json.loads(completion.choices[0].message.content), CITY_SCHEMA)


def test_response_format_errors(http):
    def error(body):
        r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 5, **body})
        assert r.status_code == 400, r.text
        return r.json()["error"]

    err = error({"response_format": {"type": "xml"}})
    assert err["param"] == "response_format.type" and "json_schema" in err["message"]
    err = error({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "city"}}}})
    assert err["param"] == "response_format.json_schema.schema" and "city" in err["message"]
    err = error({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "pattern": "[a-"}}}})
    assert err["param"] == "response_format.json_schema.schema"
    assert error({"response_format": {"type": "json_schema"}})["param"] == "response_format.json_schema"
    assert error({"response_format": {"type": "regex"}})["param"] == "response_format.value"


def test_vllm_guided_fields(openai_client, http):
    completion = openai_client.completions.create(model="tgi", prompt="Phone:", max_tokens=30, temperature=0,
                                                  extra_body={"guided_regex": PHONE})
    assert re.fullmatch(PHONE, completion.choices[0].text) and completion.choices[0].finish_reason == "stop"
    completion = openai_client.completions.create(model="tgi", prompt="City:", max_tokens=200, temperature=0,
                                                  extra_body={"guided_json": CITY_SCHEMA})
    jsonschema.validate(json.loads(completion.choices[0].text), CITY_SCHEMA)
    answers = openai_client.chat.completions.create(
        model="tgi", messages=MESSAGES, max_tokens=10, n=4, seed=2,
        extra_body={"structured_outputs": {"choice": ["positive", "negative", "neutral"]}})
    assert {c.message.content for c in answers.choices} <= {"positive", "negative", "neutral"}
    lark = 'start: "Answer: " ("yes" | "no")'
    completion = openai_client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=10, temperature=0,
                                                       extra_body={"guided_grammar": lark})
    assert completion.choices[0].message.content in ("Answer: yes", "Answer: no")
    r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "guided_regex": "a+",
                                                "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_regex"
    r = http.post("/v1/completions", json={"prompt": "x", "guided_grammar": "start: nothing_defined"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_grammar"
    r = http.post("/v1/completions", json={"prompt": "x", "guided_choice": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_choice"


# ----------------------------------------------------------------------------------------------
# TGI grammar
# ----------------------------------------------------------------------------------------------

def test_tgi_generate_grammar(http, engine):
    r = http.post("/generate", json={"inputs": "My number is", "parameters": {
        "max_new_tokens": 40, "grammar": {"type": "regex", "value": PHONE}, "details": True}})
    assert r.status_code == 200, r.text
    assert re.fullmatch(PHONE, r.json()["generated_text"]) and r.json()["details"]["finish_reason"] == "eos_token"
    r = http.post("/generate", json={"inputs": "City:", "parameters": {
        "max_new_tokens": 200, "grammar": {"type": "json", "value": json.dumps(CITY_SCHEMA)}}})
    jsonschema.validate(json.loads(r.json()["generated_text"]), CITY_SCHEMA)
    with http.stream("POST", "/generate_stream", json={"inputs": "City:", "parameters": {
            "max_new_tokens": 200, "grammar": {"type": "json_schema", "value": {"name": "c", "schema": CITY_SCHEMA}}}}
                     ) as response:
        events = sse_events(list(response.iter_lines()))
    jsonschema.validate(json.loads(events[-1]["generated_text"]), CITY_SCHEMA)
    r = http.post("/generate", json={"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "[a-"}}})
    assert r.status_code == 422 and r.json()["error_type"] == "validation" and "regular expression" in r.json()["error"]
    assert wait_until(lambda: kv_free(engine))


def test_inference_client_grammar(server, monkeypatch):
    from huggingface_hub import InferenceClient, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the suite is offline; this server is local
    text = InferenceClient(model=server.url).text_generation(
        "Call", max_new_tokens=40, grammar={"type": "regex", "value": PHONE})
    assert re.fullmatch(PHONE, text)


# ----------------------------------------------------------------------------------------------
# The real model
# ----------------------------------------------------------------------------------------------

def test_smollm2_json_schema(smollm2_dir):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150}},
              "required": ["name", "age"], "additionalProperties": False}
    engine = make_engine(smollm2_dir, max_input_tokens=1024, max_total_tokens=2048)
    try:
        with running_server(engine) as (server, _):
            completion = OpenAI(base_url=server.url + "/v1/", api_key="-", max_retries=0).chat.completions.create(
                model="tgi", max_tokens=60, temperature=0,
                messages=[{"role": "user", "content": "Alice is 30 years old. Give her name and age as JSON."}],
                response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    finally:
        engine.shutdown()
    answer = json.loads(completion.choices[0].message.content)
    jsonschema.validate(answer, schema)
    assert completion.choices[0].finish_reason == "stop"
    assert answer["name"] == "Alice" and answer["age"] == 30


def test_grammar_request_never_blocks_the_engine(http, engine):
    # A grammar the engine cannot satisfy in budget ends with "length", and the engine keeps serving.
    r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3, "temperature": 0,
                                                "response_format": {"type": "json_object"}})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["choices"][0]["message"]["content"].startswith("{")
    assert httpx.get(str(http.base_url) + "/health").status_code == 200


def test_grammar_cache_is_bounded_in_bytes(engine, monkeypatch):
    compiler = GrammarCompiler(engine.tokenizer, engine.vocab_size, engine.eos_token_ids)   # a fresh cache
    monkeypatch.setattr(GrammarCompiler, "CACHE_BYTES", 4000)
    grammars = [regex_grammar("(" + "|".join(f"w{i}x{j}" for j in range(60)) + ")") for i in range(6)]
    for grammar in grammars:
        assert compiler.compile(grammar).matches(f"w{grammars.index(grammar)}x7")
    assert 0 < compiler._cache_bytes == sum(map(len, compiler._cache)) <= 4000
    assert list(compiler._cache) == grammars[-len(compiler._cache):]       # the most recent ones kept
    huge = regex_grammar("(" + "|".join(f"h{j}" for j in range(400)) + ")")   # over a quarter: compiled, not kept
    assert compiler.compile(huge).matches("h7") and huge not in compiler._cache


def test_grammar_compilation_is_bounded_in_time(http, monkeypatch):
    """A grammar that does not compile in time gets a 400 naming the field; the request does not wait for it."""
    import threading

    from tgi_nb.server import guided

    release = threading.Event()

    def stuck(engine, spec):
        release.wait(60)
        raise AssertionError("compiled too late")

    monkeypatch.setattr(guided, "compile_guide_sync", stuck)
    monkeypatch.setattr(guided, "GRAMMAR_COMPILE_TIMEOUT", 0.2)
    try:
        r = http.post("/v1/chat/completions", json={"model": "tgi", "messages": MESSAGES, "max_tokens": 4,
                                                    "response_format": {"type": "json_object"}})
    finally:
        release.set()
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
    assert "could not be compiled within 0.2 s" in r.json()["error"]["message"]
