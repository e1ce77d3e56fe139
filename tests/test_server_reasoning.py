"""Reasoning end to end: a real (tiny, hand-set) model whose output holds a think block, served with a chat
template that opens ``<think>`` for it, through the openai SDK on both APIs, streamed and not.

The model is a llama whose layers add nothing (``o_proj`` and ``down_proj`` are zero), so each logit row
depends on the current token alone; its ``lm_head`` then makes the greedy next token a fixed successor of
the current one. After the template's ``<think>\\n`` it writes ``Let me think</think> Paris is the capital.``
and ends, token by token, whatever else the engine does. Under a grammar the answer part follows the
grammar instead: that is the point of the grammar tests.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from openai import OpenAI

from conftest import build_tiny_model
from server_fixtures import make_engine, running_server
from tgi_nb.server.reasoning import MAY_OPEN, THINKING, ReasoningSplitter, answer_text, think_grammar

# SmolLM2's tokens: "\n" (the last prompt token) -> Let, me, think, </, think, >, Paris, is, the, capital, ., <|im_end|>
CHAIN = [198, 4239, 549, 1510, 9617, 17400, 46, 7042, 314, 260, 3575, 30, 2]
REASONING, ANSWER = "Let me think", "Paris is the capital."
THINKING_TOKENS = 6  # Let, me, think and the three tokens of </think>

# A template that opens the think block for the model unless enable_thinking is false (as Qwen3's closes
# an empty one), and gives earlier turns' thinking back (reasoning_content).
TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{%- if m.role == 'assistant' and m.reasoning_content %}<think>\n{{ m.reasoning_content }}\n</think>\n\n"
    "{%- endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>"
    "{%- else %}<think>\n{% endif %}{% endif %}")
SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
          "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "get_city", "parameters": SCHEMA}}


def build_chain_model(out, tokenizer_dir):
    """The tiny llama above, written to ``out``."""
    from safetensors.torch import load_file, save_file

    build_tiny_model(out, "llama", torch.float32, tokenizer_dir, tie_word_embeddings=False)
    path = out / "model.safetensors"
    weights = load_file(path)
    for name in weights:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name].zero_()
    embed = weights["model.embed_tokens.weight"]
    head = torch.zeros_like(weights["lm_head.weight"])
    for current, following in zip(CHAIN, CHAIN[1:]):
        head[following] = 4.0 * embed[current] / embed[current].norm()
    weights["lm_head.weight"] = head
    save_file(weights, path, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def engine(tmp_path_factory, smollm2_dir):
    engine = make_engine(build_chain_model(tmp_path_factory.mktemp("chain"), smollm2_dir))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def client(engine):
    with running_server(engine, chat_template=TEMPLATE) as (server, _):
        yield OpenAI(base_url=server.url + "/v1/", api_key="-", max_retries=0)


MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


# ----------------------------------------------------------------------------------------------
# Chat completions
# ----------------------------------------------------------------------------------------------

def test_chat_reasoning_content(client):
    completion = client.chat.completions.create(model="tgi", messages=MESSAGES, temperature=0, max_tokens=30)
    message = completion.choices[0].message
    assert message.content == ANSWER and completion.choices[0].finish_reason == "stop"
    assert message.reasoning_content == REASONING and message.reasoning == REASONING  # both names clients read
    assert completion.usage.completion_tokens_details.reasoning_tokens == THINKING_TOKENS


def test_chat_reasoning_streamed(client):
    stream = client.chat.completions.create(model="tgi", messages=MESSAGES, temperature=0, max_tokens=30,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    # The SDK keeps fields it has no type for as extras: present only on the chunks that carry them.
    deltas = [c.choices[0].delta.model_dump() for c in chunks if c.choices]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == REASONING
    assert "".join(d.get("reasoning") or "" for d in deltas) == REASONING
    assert "".join(d["content"] or "" for d in deltas) == ANSWER
    # thinking arrives before the answer, token by token
    first_content = next(i for i, d in enumerate(deltas) if d["content"])
    assert all(not d.get("reasoning_content") for d in deltas[first_content:])
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == THINKING_TOKENS


def test_enable_thinking_false_and_effort(client):
    off = client.chat.completions.create(model="tgi", messages=MESSAGES, temperature=0, max_tokens=30,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    # The template closed an empty block: after its "</think>" this model goes straight to the answer.
    message = off.choices[0].message
    assert message.content == ANSWER and getattr(message, "reasoning_content", None) is None
    assert off.usage.completion_tokens_details.reasoning_tokens == 0
    effort_none = client.chat.completions.create(model="tgi", messages=MESSAGES, temperature=0, max_tokens=30,
                                                 reasoning_effort="none")
    assert effort_none.choices[0].message.content == message.content
    effort_high = client.chat.completions.create(model="tgi", messages=MESSAGES, temperature=0, max_tokens=30,
                                                 reasoning_effort="high")
    assert effort_high.choices[0].message.reasoning_content == REASONING


def test_json_is_parsed_from_the_answer(client):
    completion = client.chat.completions.create(
        model="tgi", messages=MESSAGES, temperature=0, max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}})
    message = completion.choices[0].message
    assert message.reasoning_content == REASONING  # the grammar let the thinking run free
    jsonschema.validate(json.loads(message.content), SCHEMA)


def test_tool_calls_are_parsed_from_the_answer(client):
    completion = client.chat.completions.create(model="tgi", messages=MESSAGES, temperature=0, max_tokens=60,
                                                tools=[TOOL], tool_choice="required", parallel_tool_calls=False)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.reasoning_content == REASONING
    jsonschema.validate(json.loads(choice.message.tool_calls[0].function.arguments), SCHEMA)


# ----------------------------------------------------------------------------------------------
# Responses
# ----------------------------------------------------------------------------------------------

def test_responses_reasoning_item(client):
    response = client.responses.create(model="tgi", input=MESSAGES[0]["content"], temperature=0,
                                       max_output_tokens=30)
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].content[0].text == REASONING and response.output[0].summary == []
    assert response.output_text == ANSWER and response.status == "completed"
    assert response.usage.output_tokens_details.reasoning_tokens == THINKING_TOKENS
    # the next turn gives the thinking back to the template (reasoning_content), which renders it
    follow = client.responses.create(model="tgi", input="And of Italy?", previous_response_id=response.id,
                                     temperature=0, max_output_tokens=30)
    again = client.responses.create(model="tgi", temperature=0, max_output_tokens=30, store=False, input=[
        {"role": "user", "content": MESSAGES[0]["content"]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": REASONING}]},
        {"role": "assistant", "content": ANSWER}, {"role": "user", "content": "And of Italy?"}])
    assert follow.usage.input_tokens == again.usage.input_tokens


def test_responses_reasoning_streamed(client):
    with client.responses.stream(model="tgi", input=MESSAGES[0]["content"], temperature=0,
                                 max_output_tokens=30) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert types[2:5] == ["response.output_item.added", "response.content_part.added",
                          "response.reasoning_text.delta"]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == REASONING
    done = next(e for e in events if e.type == "response.reasoning_text.done")
    assert done.text == REASONING and types.index("response.reasoning_text.done") < types.index(
        "response.output_text.delta")
    assert [item.type for item in final.output] == ["reasoning", "message"] and final.output_text == ANSWER
    assert final.usage.output_tokens_details.reasoning_tokens == THINKING_TOKENS


def test_responses_effort_none_and_json(client):
    off = client.responses.create(model="tgi", input="Capital?", reasoning={"effort": "none"}, temperature=0,
                                  max_output_tokens=30)
    assert [item.type for item in off.output] == ["message"] and off.reasoning.effort == "none"
    shaped = client.responses.create(model="tgi", input="Capital?", temperature=0, max_output_tokens=40,
                                     text={"format": {"type": "json_schema", "name": "c", "schema": SCHEMA}})
    assert shaped.output[0].type == "reasoning"
    jsonschema.validate(json.loads(shaped.output_text), SCHEMA)


# ----------------------------------------------------------------------------------------------
# The parser and the grammar, without a model
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["<think>\nA plan.\n</think>\n\nDone.", "  <think>A plan.</think>Done."])
def test_splitter_agrees_on_every_split(text):
    for cut in range(len(text) + 1):
        splitter = ReasoningSplitter(MAY_OPEN)
        parts = [splitter.feed(text[:cut]), splitter.feed(text[cut:]), splitter.finish()]
        assert ("".join(p[0] for p in parts), "".join(p[1] for p in parts)) == ("A plan.", "Done."), cut


def test_splitter_without_a_block_and_cut_short():
    splitter = ReasoningSplitter(MAY_OPEN)
    assert splitter.feed("<thi")[1] == "" and splitter.finish() == ("", "<thi")
    splitter = ReasoningSplitter(THINKING)
    assert splitter.feed("Hmm </thi") == ("Hmm", "") and splitter.finish() == ("</thi", "")
    assert answer_text('<think>a <tool_call>{"name": "f"}</tool_call></think>x', MAY_OPEN) == "x"


def test_think_grammar_wraps_the_answer(engine):
    from tgi_nb.engine.guided_decoding import GrammarCompiler, json_schema_grammar

    compiler = GrammarCompiler.for_tokenizer(engine.tokenizer, engine.vocab_size, engine.eos_token_ids)
    inner = json_schema_grammar(SCHEMA)
    may = compiler.compile(think_grammar(inner, MAY_OPEN))
    must = compiler.compile(think_grammar(inner, THINKING))
    assert may.matches('{"city": "Rome"}') and may.matches('<think>x {"city": "Oslo"}</think>\n\n{"city": "Rome"}')
    assert not may.matches('<think>x</think>{"city": "Oslo"}')
    assert must.matches('x</think>{"city": "Paris"}') and not must.matches('{"city": "Paris"}')


def test_reasoning_parser_option():
    import argparse

    from tgi_nb.server.launcher import LaunchError, plan_from_options, resolve_options

    plan = plan_from_options(resolve_options(argparse.Namespace(), {"REASONING_PARSER": "deepseek_r1"}))
    assert plan.settings.reasoning_parser == "deepseek_r1"
    with pytest.raises(LaunchError, match="reasoning_parser: must be one of 'qwen3'.*got 'granite'"):
        plan_from_options(resolve_options(argparse.Namespace(), {"REASONING_PARSER": "granite"}))
