"""End to end with the real bundled SmolLM2-135M-Instruct: answers that make sense, through the OpenAI SDK."""

from __future__ import annotations

import pytest
from openai import OpenAI

from server_fixtures import kv_free, make_engine, running_server, wait_until

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    engine = make_engine(smollm2_dir, max_input_tokens=1024, max_total_tokens=2048)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def client(engine):
    with running_server(engine, served_model_name=None, model_id="HuggingFaceTB/SmolLM2-135M-Instruct") as (server, _):
        yield OpenAI(base_url=server.url + "/v1/", api_key="-", max_retries=0)


def test_answers_the_question(client):
    completion = client.chat.completions.create(model="tgi", messages=QUESTION, max_tokens=20, temperature=0)
    assert "Paris" in completion.choices[0].message.content
    assert completion.model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tgi", messages=QUESTION, max_tokens=20, temperature=0, stream=True) if c.choices)
    assert streamed == completion.choices[0].message.content


def test_eos_ends_with_stop(client):
    completion = client.chat.completions.create(model="tgi", messages=QUESTION, max_tokens=60, temperature=0)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and "<|im_end|>" not in choice.message.content
    assert completion.usage.completion_tokens < 60


def test_stop_string(client):
    completion = client.chat.completions.create(model="tgi", messages=QUESTION, max_tokens=20, temperature=0,
                                                stop=["Paris"])
    choice = completion.choices[0]
    assert "Paris" not in choice.message.content and choice.finish_reason == "stop"


def test_seeded_samples(client):
    kwargs = dict(model="tgi", messages=QUESTION, max_tokens=12, temperature=0.8, n=2, seed=42)
    first = [c.message.content for c in client.chat.completions.create(**kwargs).choices]
    second = [c.message.content for c in client.chat.completions.create(**kwargs).choices]
    assert first == second and len(first) == 2


def test_multibyte_text_and_logprob_bytes(client, engine):
    completion = client.chat.completions.create(
        model="tgi", max_tokens=16, temperature=0, logprobs=True,
        messages=[{"role": "user", "content": "Repeat exactly: Café ☕ 😀 naïve"}])
    content = completion.choices[0].message.content
    data = b"".join(bytes(lp.bytes) for lp in completion.choices[0].logprobs.content)
    assert data.decode("utf-8") == content  # token bytes add up to the text, split characters included
    assert "\ufffd" not in content
    assert wait_until(lambda: kv_free(engine))


def test_an_answer_after_a_tool_result_is_words_not_the_echoed_tag(client):
    """SmolLM2's template knows no tools: the result goes in as a <tool_response> turn, which the model used
    to copy, tag and all (notebook 03's answer); the answer's first token may not open a tag."""
    messages = [{"role": "user", "content": "What is the weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "It is sunny and 24 degrees in Paris."}]
    answer = client.chat.completions.create(model="tgi", messages=messages, max_tokens=40, temperature=0)
    text = answer.choices[0].message.content
    assert "<tool_response>" not in text and "sunny" in text, text
