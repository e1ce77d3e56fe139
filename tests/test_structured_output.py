"""Structured output and tool calls that finish: the grammar bounds (numbers, json_object depth and size), the
guard that ends a tool-call output at a repeated call, the parser that drops it, and the bundled SmolLM2 on the
prompts that used to run until max_tokens (issue 8)."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from openai import OpenAI
from transformers import AutoTokenizer

from server_fixtures import kv_free, make_engine, running_server, wait_until
from tgi_nb.engine.guided_decoding import (MAX_FRACTION_DIGITS, MAX_INTEGER_DIGITS, GrammarCompiler,
                                           GrammarError, json_object_grammar, json_schema_grammar, lark_grammar,
                                           with_json_style)
from tgi_nb.server.tool_parser import ToolCallGuard, ToolCallParser, parse_tool_calls
from tgi_nb.server.tools import tool_call_text

EOS = 2  # SmolLM2's <|im_end|>


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler.for_tokenizer(tokenizer, vocab_size=49152, eos_token_ids=[EOS])


def nested(depth: int) -> str:
    """An object ``depth`` levels deep: {"a": {"a": ... 1}}."""
    return '{"a": ' * depth + "1" + "}" * depth


# ----------------------------------------------------------------------------------------------
# Grammar bounds
# ----------------------------------------------------------------------------------------------

def test_json_object_is_bounded_in_depth_and_size(compiler):
    grammar = compiler.compile(json_object_grammar(max_depth=3, max_properties=4, max_items=5))
    assert grammar.matches(nested(3)) and not grammar.matches(nested(4))
    assert grammar.matches('{"a": [[1]]}') and not grammar.matches('{"a": [[[1]]]}')  # arrays count as levels
    members = ", ".join(f'"k{i}": {i}' for i in range(4))
    assert grammar.matches("{" + members + "}") and not grammar.matches("{" + members + ', "k4": 4}')
    assert grammar.matches('{"a": [1, 2, 3, 4, 5]}') and not grammar.matches('{"a": [1, 2, 3, 4, 5, 6]}')
    for text in ('{}', '{"s": "a\\"b\\\\c\\u00e9 ☕", "t": true, "f": false}', '{"n": null, "x": -0.5, "e": []}'):
        assert grammar.matches(text), text
    for text in ('{"a": 1,}', "[1]", '{"a": 01}', '{"a": "\n"}', '{"a":1}', '{"a": 1e5}'):
        assert not grammar.matches(text), text  # invalid JSON, not an object, or not json.dumps' layout


def test_default_json_object_grammar(compiler):
    grammar = compiler.compile(json_object_grammar())
    assert grammar.matches(nested(5)) and not grammar.matches(nested(6))
    assert grammar.matches(json.dumps({f"k{i}": i for i in range(16)}))
    assert not grammar.matches(json.dumps({f"k{i}": i for i in range(17)}))
    assert grammar.matches(json.dumps({"a": list(range(32))}))
    assert not grammar.matches(json.dumps({"a": list(range(33))}))
    with pytest.raises(ValueError, match="max_depth"):
        json_object_grammar(max_depth=0)


def inline_json_grammar(schema):
    """The schema as a tool call's arguments are compiled: a %json inside a Lark grammar."""
    return lark_grammar(f"start: %json{json.dumps(with_json_style(schema))}")


@pytest.mark.parametrize("make", [json_schema_grammar, inline_json_grammar], ids=["json_schema", "lark_json"])
def test_numbers_without_bounds_get_them(compiler, make):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "x": {"type": "number"},
                                               "mixed": {"type": ["integer", "null"]}},
              "required": ["n", "x", "mixed"], "additionalProperties": False}
    grammar = compiler.compile(make(schema))

    def doc(n: str = "1", x: str = "1.5", mixed: str = "null") -> str:
        return f'{{"n": {n}, "x": {x}, "mixed": {mixed}}}'

    most = "9" * MAX_INTEGER_DIGITS
    assert grammar.matches(doc(n=most)) and grammar.matches(doc(n="-" + most))
    assert not grammar.matches(doc(n=most + "9"))
    assert grammar.matches(doc(mixed=most)) and not grammar.matches(doc(mixed=most + "9"))
    assert grammar.matches(doc(x="0." + "1" * MAX_FRACTION_DIGITS))
    assert not grammar.matches(doc(x="0." + "1" * (MAX_FRACTION_DIGITS + 1)))
    assert grammar.matches(doc(x="-3")) and not grammar.matches(doc(x="1e5"))


def test_only_schemas_are_bounded(compiler):
    # A property named "type" or "minimum" is a name, not a keyword; a "type" that is not a string is
    # llguidance's to reject (a 400 naming the field, never a crash here).
    schema = {"type": "object", "properties": {"type": {"type": "string"}, "minimum": {"type": "integer"}},
              "required": ["type", "minimum"], "additionalProperties": False}
    grammar = compiler.compile(json_schema_grammar(schema))
    assert grammar.matches('{"type": "bike", "minimum": 3}')
    assert not grammar.matches('{"type": "bike", "minimum": ' + "1" * (MAX_INTEGER_DIGITS + 1) + "}")
    try:  # (it used to raise TypeError: unhashable type 'dict', a 500)
        compiler.compile(json_schema_grammar({"type": {"type": "integer"}}))
    except GrammarError:
        pass
    nested = {"anyOf": [{"type": "integer"}, {"type": "array", "items": {"$ref": "#/$defs/n"}}],
              "$defs": {"n": {"type": "number"}}}
    grammar = compiler.compile(json_schema_grammar(nested))
    assert grammar.matches("[1.5, 2]") and not grammar.matches("[0." + "1" * (MAX_FRACTION_DIGITS + 1) + "]")
    assert not grammar.matches("1" * (MAX_INTEGER_DIGITS + 1))


def test_bounds_the_client_set_are_kept(compiler):
    big = {"type": "integer", "minimum": 0, "maximum": 10 ** 18}
    grammar = compiler.compile(json_schema_grammar(big))
    assert grammar.matches("1" * 18) and not grammar.matches("-1")
    coarse = compiler.compile(json_schema_grammar({"type": "number", "multipleOf": 0.5}))
    assert coarse.matches("2.5") and not coarse.matches("2.25")
    exact = compiler.compile(json_schema_grammar({"enum": [10 ** 16]}))  # not a type: untouched
    assert exact.matches(str(10 ** 16))


# ----------------------------------------------------------------------------------------------
# Ending tool-call outputs: the guard (engine side) and the parser (what the client gets)
# ----------------------------------------------------------------------------------------------

CALL_A = tool_call_text("get_weather", {"city": "Paris"})
CALL_A_REORDERED = '<tool_call>\n{"arguments": {"city": "Paris"}, "name": "get_weather"}\n</tool_call>'
CALL_B = tool_call_text("get_weather", {"city": "Paris", "unit": "celsius"})


def allowed_after(guard: ToolCallGuard, tokenizer, text: str) -> list[int]:
    """The token ids the guard leaves allowed after the model wrote ``text``."""
    logits = guard(tokenizer.encode(text), torch.zeros(49152))
    return torch.isfinite(logits).nonzero().flatten().tolist()


def test_guard_ends_the_output_at_a_repeated_call(tokenizer):
    guard = lambda single=False: ToolCallGuard(None, tokenizer, [EOS], single=single)  # noqa: E731
    assert len(allowed_after(guard(), tokenizer, CALL_A)) == 49152               # a first call: go on
    assert len(allowed_after(guard(), tokenizer, CALL_A + "\n" + CALL_B)) == 49152  # a different one: go on
    assert len(allowed_after(guard(), tokenizer, CALL_A + "\n" + CALL_B + "\n<tool_call>\n{")) == 49152
    assert allowed_after(guard(), tokenizer, CALL_A + "\n" + CALL_B + "\n" + CALL_A) == [EOS]
    assert allowed_after(guard(), tokenizer, CALL_A + "\n" + CALL_A_REORDERED + "\n") == [EOS]
    assert allowed_after(guard(single=True), tokenizer, "Sure. " + CALL_B) == [EOS]
    assert len(allowed_after(guard(single=True), tokenizer, "Sure. <tool_call>\n{")) == 49152
    # The closing tag written inside an argument is not the end of the call.
    inside = '<tool_call>\n{"name": "calculate", "arguments": {"expression": "1}}</tool_call>'
    assert len(allowed_after(guard(single=True), tokenizer, inside)) == 49152
    assert len(allowed_after(guard(), tokenizer, CALL_A + "\n" + inside)) == 49152


def test_guard_runs_the_grammar_first(tokenizer, compiler):
    from tgi_nb.server.tools import plan_tools

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    plan = plan_tools(tools, "required", None)
    grammar = compiler.compile(plan.guide().grammar)
    factory = plan.processor_factory(grammar.processor, tokenizer, [EOS])
    start = factory()
    assert len(allowed_after(start, tokenizer, "")) < 49152           # the grammar: only "<tool_call>" may begin
    assert allowed_after(factory(), tokenizer, CALL_A + "\n" + CALL_A) == [EOS]
    # Where the grammar does not let the output end, the guard never ends it (the tag is inside a string).
    inside = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "</tool_call>'
    assert EOS not in allowed_after(factory(), tokenizer, CALL_A + "\n" + inside)


REPEATS = [
    CALL_A + "\n" + CALL_A,
    CALL_A + "\n" + CALL_B + "\n" + CALL_A + "\n" + CALL_B,
    CALL_A + "\n" + CALL_A_REORDERED,
    CALL_B + "\n" + CALL_A,                                      # A's arguments begin like B's: held, then sent
    CALL_A + "\n" + CALL_A[:-20],                                # a repeat cut short by max_tokens
    CALL_A + "\n" + CALL_B[:-20],                                # a new call cut short: kept as far as it got
    "Let me look. " + CALL_A + "\n" + CALL_A,
    json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}}] * 2),
]


@pytest.mark.parametrize("single", [False, True], ids=["parallel", "single"])
@pytest.mark.parametrize("output", REPEATS)
def test_parser_drops_repeats_streamed_or_not(output, single):
    content, calls = parse_tool_calls(output, ["get_weather"], single=single)
    keys = [json.dumps([c["function"]["name"], json.loads(c["function"]["arguments"])], sort_keys=True)
            for c in calls if c["function"]["arguments"].endswith("}")]
    assert len(keys) == len(set(keys)) and calls
    if single:
        assert len(calls) == 1
    for split in range(len(output) + 1):
        parser = ToolCallParser(["get_weather"], single)
        pieces = [parser.feed(output[:split]), parser.feed(output[split:]), parser.finish()]
        assert "".join(text for text, _ in pieces) == (content or "")
        merged: dict[int, list[str]] = {}
        for _, deltas in pieces:
            for d in deltas:
                entry = merged.setdefault(d["index"], ["", ""])
                entry[0] += d["function"].get("name", "")
                entry[1] += d["function"]["arguments"]
        assert [tuple(m) for _, m in sorted(merged.items())] == \
            [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


def test_parser_results_without_repeats():
    calls = parse_tool_calls(REPEATS[1], ["get_weather"])[1]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"},
                                                                      {"city": "Paris", "unit": "celsius"}]
    assert [c["function"]["arguments"] for c in parse_tool_calls(REPEATS[3], ["get_weather"])[1]] == \
        ['{"city": "Paris", "unit": "celsius"}', '{"city": "Paris"}']
    assert parse_tool_calls(REPEATS[6], ["get_weather"])[0] == "Let me look."
    assert len(parse_tool_calls(REPEATS[1], ["get_weather"], single=True)[1]) == 1


# ----------------------------------------------------------------------------------------------
# The bundled SmolLM2 at temperature 0: the prompts from issue 8 finish with valid output
# ----------------------------------------------------------------------------------------------

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
WEATHER_QUESTION = [{"role": "user", "content": "What's the weather in Paris?"}]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    engine = make_engine(smollm2_dir, max_input_tokens=1024, max_total_tokens=2048)
    with running_server(engine) as (server, _):
        yield OpenAI(base_url=server.url + "/v1/", api_key="-", max_retries=0), engine
    engine.shutdown()


def ask(client, **kwargs):
    return client.chat.completions.create(model="tgi", max_tokens=200, temperature=0, **kwargs).choices[0]


def test_smollm2_json_object_finishes(smollm2):
    client, engine = smollm2
    choice = ask(client, messages=[{"role": "user", "content": "Give me a small JSON object describing a cat."}],
                 response_format={"type": "json_object"})
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(json.loads(choice.message.content), dict)
    assert wait_until(lambda: kv_free(engine))


def test_smollm2_json_schema_integer_finishes(smollm2):
    client, _ = smollm2
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "country": {"type": "string"},
                                               "population": {"type": "integer"}},
              "required": ["name", "country", "population"], "additionalProperties": False}
    choice = ask(client, messages=[{"role": "user", "content": "Describe Paris."}],
                 response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    assert choice.finish_reason == "stop", choice.message.content
    answer = json.loads(choice.message.content)
    jsonschema.validate(answer, schema)
    assert len(str(abs(answer["population"]))) <= MAX_INTEGER_DIGITS


def test_smollm2_required_tool_call_finishes_without_repeats(smollm2):
    client, _ = smollm2
    kwargs = dict(messages=WEATHER_QUESTION, tools=[WEATHER_TOOL], tool_choice="required")
    choice = ask(client, **kwargs)
    assert choice.finish_reason == "tool_calls"
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    assert calls and all(name == "get_weather" and isinstance(args.get("city"), str) for name, args in calls)
    assert len({json.dumps(c, sort_keys=True) for c in calls}) == len(calls)
    # Streamed, openai-python's accumulator rebuilds the same calls (repeats held back, then dropped).
    with client.chat.completions.stream(model="tgi", max_tokens=200, temperature=0, **kwargs) as stream:
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in final.message.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]


def test_smollm2_no_parallel_tool_calls_gives_one_call(smollm2):
    client, _ = smollm2
    choice = ask(client, messages=WEATHER_QUESTION, tools=[WEATHER_TOOL], tool_choice="required",
                 parallel_tool_calls=False)
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
