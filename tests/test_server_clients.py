"""The frameworks people migrate with, unchanged, against a real server: LangChain's ChatOpenAI, LlamaIndex's
OpenAILike and huggingface_hub's InferenceClient (the cookbook's calls, with an API key as HF_TOKEN)."""

from __future__ import annotations

import asyncio

import pytest

from server_fixtures import kv_free, running_server, wait_until
from server_fixtures import engine  # noqa: F401  (module-scoped fixtures)

API_KEY = "hf_test_token"


@pytest.fixture(scope="module")
def base_url(engine):
    with running_server(engine, api_key=API_KEY) as (server, _):
        yield server.url


def test_langchain_chat_openai(base_url, engine):
    from langchain_core.messages import AIMessageChunk
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model_name="tgi", openai_api_key=API_KEY, openai_api_base=base_url + "/v1/", max_tokens=6,
                     temperature=0, max_retries=0)
    answer = llm.invoke("Why is open-source software important?")
    assert isinstance(answer.content, str) and answer.content
    assert answer.response_metadata["finish_reason"] == "length"
    assert answer.usage_metadata["output_tokens"] == 6

    chunks = list(llm.stream("Why is open-source software important?"))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert "".join(c.content for c in chunks) == answer.content

    batch = llm.batch(["Hi", "Why is open-source software important?", "Bonjour"])
    assert len(batch) == 3 and batch[1].content == answer.content

    async def astream() -> str:
        return "".join([c.content async for c in llm.astream("Why is open-source software important?")])

    assert asyncio.run(astream()) == answer.content
    assert wait_until(lambda: kv_free(engine))


def test_llama_index_openai_like(base_url):
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai_like import OpenAILike

    llm = OpenAILike(model="tgi", api_key=API_KEY, api_base=base_url + "/v1/", is_chat_model=True, is_local=False,
                     is_function_calling_model=False, context_window=512, max_tokens=6, temperature=0,
                     max_retries=0)
    completion = llm.complete("Why is open-source software important?")
    assert completion.text
    chat = llm.chat([ChatMessage(role="system", content="You are a helpful assistant."),
                     ChatMessage(role="user", content="Why is open-source software important?")])
    assert chat.message.content
    streamed = list(llm.stream_chat([ChatMessage(role="user", content="Why is open-source software important?")]))
    assert streamed[-1].message.content == "".join(r.delta or "" for r in streamed)
    assert streamed[-1].message.content == completion.text  # same prompt through the chat template, greedy

    text_llm = OpenAILike(model="tgi", api_key=API_KEY, api_base=base_url + "/v1/", is_chat_model=False,
                          context_window=512, max_tokens=4, temperature=0, max_retries=0)
    assert text_llm.complete("Hello").text
    assert "".join(r.delta for r in text_llm.stream_complete("Hello")) == text_llm.complete("Hello").text


@pytest.fixture
def local_requests(monkeypatch):
    """huggingface_hub's offline mode (set for the whole suite) refuses every request, even to 127.0.0.1;
    lift it for tests whose only server is ours."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_inference_client_chat_completion(base_url, local_requests):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=base_url, api_key=API_KEY)
    messages = [{"role": "user", "content": "What is TGI?"}]
    out = client.chat_completion(messages, max_tokens=6, temperature=0)
    assert out.choices[0].message.content and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 6
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat_completion(messages, max_tokens=6, temperature=0, stream=True) if c.choices)
    assert streamed == out.choices[0].message.content
    # The OpenAI-style alias works too.
    assert client.chat.completions.create(model="tgi", messages=messages, max_tokens=2).choices[0].message.content


def test_inference_client_text_generation(base_url, local_requests):
    from huggingface_hub import InferenceClient

    client = InferenceClient(model=base_url, token=API_KEY)
    text = client.text_generation("The huggingface_hub library is ", max_new_tokens=5)
    assert isinstance(text, str) and text
    details = client.text_generation("The huggingface_hub library is ", max_new_tokens=5, details=True)
    assert details.generated_text == text
    assert details.details.finish_reason == "length" and details.details.generated_tokens == 5
    assert len(details.details.tokens) == 5
    tokens = list(client.text_generation("The huggingface_hub library is ", max_new_tokens=5, stream=True))
    assert "".join(tokens) == text
    stream_details = list(client.text_generation("The huggingface_hub library is ", max_new_tokens=5, stream=True,
                                                 details=True))
    assert stream_details[-1].generated_text == text
    assert stream_details[-1].details.finish_reason == "length"
    full = client.text_generation("Hello", max_new_tokens=3, return_full_text=True, do_sample=True, seed=3)
    assert full.startswith("Hello")


def test_inference_client_errors(base_url, local_requests):
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import HfHubHTTPError, TextGenerationError, ValidationError

    client = InferenceClient(model=base_url, token=API_KEY)
    with pytest.raises(ValidationError, match="max_total_tokens|maximum context length"):
        client.text_generation("Hello", max_new_tokens=5000)
    with pytest.raises(TextGenerationError, match="Incorrect API key"):
        InferenceClient(model=base_url, token="wrong").text_generation("Hello", max_new_tokens=2)
    with pytest.raises(HfHubHTTPError) as err:  # /v1 errors are OpenAI's, which huggingface_hub reports as HTTP errors
        InferenceClient(base_url=base_url, api_key="wrong").chat_completion([{"role": "user", "content": "x"}])
    assert err.value.response.status_code == 401
