"""The official openai Python SDK against a real server (tiny random llama): shapes, streaming, n, logprobs,
stop, seed, usage, completions, models and error classes."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from server_fixtures import kv_free, wait_until
from tgi_nb.engine import SamplingParams
from server_fixtures import engine, server  # noqa: F401  (module-scoped fixtures)

MESSAGES = [{"role": "system", "content": "You are a concise API assistant."},
            {"role": "user", "content": "What is TGI?"}]


@pytest.fixture(scope="module")
def client(server):
    # max_retries=0: a 429 or 503 must surface as the error class, not be retried away.
    return OpenAI(base_url=server.url + "/v1/", api_key="-", max_retries=0)


def test_chat_completion_shape(client):
    completion = client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=8, stream=False)
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "tiny"  # any name in, the served name out
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert choice.logprobs is None
    usage = completion.usage
    assert usage.completion_tokens <= 8 and usage.prompt_tokens > 10
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_greedy_is_deterministic_and_matches_stream(client):
    kwargs = dict(model="tgi", messages=MESSAGES, max_tokens=12, temperature=0)
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(chunk.choices[0].delta.content or ""
                       for chunk in client.chat.completions.create(**kwargs, stream=True) if chunk.choices)
    assert a == b == streamed


def test_chat_stream_chunks(client):
    chunks = list(client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=6, stream=True))
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" and c.model == "tiny" for c in chunks)
    roles = [c.choices[0].delta.role for c in chunks]
    assert roles[0] == "assistant" and not any(roles[1:])
    finishes = [c.choices[0].finish_reason for c in chunks]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert all(c.usage is None for c in chunks)


def test_chat_stream_include_usage(client):
    chunks = list(client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=5, stream=True,
                                                 stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.id == chunks[0].id
    assert last.usage.completion_tokens == 5
    assert last.usage.total_tokens == last.usage.prompt_tokens + 5


def test_chat_n_with_stream_and_logprobs(client):
    chunks = list(client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=4, n=3, seed=7,
                                                 temperature=1.0, stream=True, logprobs=True, top_logprobs=2,
                                                 stream_options={"include_usage": True}))
    texts, roles, finishes, logprobs = {}, {}, {}, {}
    for chunk in chunks:
        for choice in chunk.choices:
            i = choice.index
            texts[i] = texts.get(i, "") + (choice.delta.content or "")
            roles.setdefault(i, []).append(choice.delta.role)
            if choice.finish_reason:
                finishes[i] = choice.finish_reason
            if choice.logprobs and choice.logprobs.content:
                logprobs.setdefault(i, []).extend(choice.logprobs.content)
    assert sorted(texts) == [0, 1, 2]
    for i in range(3):
        assert roles[i][0] == "assistant" and not any(roles[i][1:])
        assert finishes[i] == "length"
        assert len(logprobs[i]) == 4
        for lp in logprobs[i]:
            assert lp.logprob <= 0 and len(lp.top_logprobs) == 2
            assert bytes(lp.bytes).decode("utf-8", errors="replace")
    assert "".join(lp.token for lp in logprobs[0]) == texts[0]
    assert chunks[-1].usage.completion_tokens == 12


def test_chat_logprobs_non_stream(client):
    completion = client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=5, temperature=0,
                                                logprobs=True, top_logprobs=3)
    content = completion.choices[0].logprobs.content
    assert len(content) == 5
    for lp in content:
        # Greedy: the chosen token is the most likely one, so it tops its own alternatives.
        assert lp.top_logprobs[0].token == lp.token
        assert lp.top_logprobs[0].logprob == pytest.approx(lp.logprob, abs=1e-4)
        assert lp.top_logprobs[0].logprob >= lp.top_logprobs[1].logprob >= lp.top_logprobs[2].logprob
    assert "".join(lp.token for lp in content) == completion.choices[0].message.content


def test_chat_n_non_stream(client):
    completion = client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=4, n=2, seed=1)
    assert [c.index for c in completion.choices] == [0, 1]
    assert completion.usage.completion_tokens == 8


def test_stop_string_never_leaks(client):
    full = client.completions.create(model="tgi", prompt="The quick brown fox", max_tokens=24,
                                     temperature=0).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    expected = full[:full.find(stop)]
    got = client.completions.create(model="tgi", prompt="The quick brown fox", max_tokens=24, temperature=0,
                                    stop=[stop, "\x00never"])
    assert got.choices[0].text == expected
    assert got.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tgi", prompt="The quick brown fox", max_tokens=24, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == expected


def test_seed_reproducibility(client):
    kwargs = dict(model="tgi", messages=MESSAGES, max_tokens=12, temperature=1.0)
    a = client.chat.completions.create(**kwargs, seed=1234).choices[0].message.content
    b = client.chat.completions.create(**kwargs, seed=1234).choices[0].message.content
    c = client.chat.completions.create(**kwargs, seed=4321).choices[0].message.content
    assert a == b
    assert a != c


def test_completions_prompts_echo_and_logprobs(client, engine):
    ids = engine.tokenizer.encode("Hello world")
    batch = client.completions.create(model="tgi", prompt=["Hello", "Bonjour"], max_tokens=3, n=2, temperature=0)
    assert batch.object == "text_completion" and [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text  # greedy: both samples agree
    from_ids = client.completions.create(model="tgi", prompt=ids, max_tokens=3, temperature=0)
    from_text = client.completions.create(model="tgi", prompt="Hello world", max_tokens=3, temperature=0)
    assert from_ids.choices[0].text == from_text.choices[0].text
    echoed = client.completions.create(model="tgi", prompt="Hello world", max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text == "Hello world" + from_text.choices[0].text
    with_lp = client.completions.create(model="tgi", prompt="Hello world", max_tokens=3, temperature=0, logprobs=2)
    lp = with_lp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 3
    assert "".join(lp.tokens) == with_lp.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    ids_batch = client.completions.create(model="tgi", prompt=[ids, ids[:1]], max_tokens=2, temperature=0)
    assert len(ids_batch.choices) == 2
    assert ids_batch.usage.prompt_tokens == len(ids) + 1


def test_completions_stream_echo_and_usage(client):
    chunks = list(client.completions.create(model="tgi", prompt="Hello", max_tokens=3, echo=True, stream=True,
                                            temperature=0, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    full = client.completions.create(model="tgi", prompt="Hello", max_tokens=3, echo=True, temperature=0)
    assert text == full.choices[0].text and text.startswith("Hello")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert len({c.id for c in chunks}) == 1


def test_completions_echo_with_logprobs_scores_the_prompt(client, engine):
    """What lm-evaluation-harness's loglikelihood sends: echo + logprobs; the prompt's tokens come back scored
    (the first with nulls), then the generated ones, in one logprobs object; streamed the same."""
    prompt = "The capital of France is Paris"
    ids = engine.tokenizer.encode(prompt)
    kwargs = dict(model="tgi", prompt=prompt, max_tokens=2, temperature=0, echo=True, logprobs=1)
    choice = client.completions.create(**kwargs).choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 2 and choice.text.startswith(prompt)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(v, float) and v <= 0 for v in lp.token_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    expected = engine.generate_sync(ids, SamplingParams(max_new_tokens=1, temperature=0, prompt_logprobs=1))
    for position in range(1, len(ids)):
        assert lp.token_logprobs[position] == pytest.approx(expected.prompt_logprobs[position].logprob, abs=1e-4)
        assert len(lp.top_logprobs[position]) == 1
    chunks = list(client.completions.create(**kwargs, stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for part in streamed for t in part.tokens] == lp.tokens
    streamed_values = [v for part in streamed for v in part.token_logprobs]
    assert streamed_values[0] is None
    assert streamed_values[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-6)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text


def test_best_of_returns_the_most_likely(client):
    best = client.completions.create(model="tgi", prompt="Hello", max_tokens=4, best_of=2, n=1, seed=5, logprobs=0)
    assert len(best.choices) == 1
    assert best.usage.completion_tokens == 8  # every candidate was generated and counted
    with pytest.raises(openai.BadRequestError) as err:   # --max-best-of (2), as on /generate
        client.completions.create(model="tgi", prompt="Hello", max_tokens=4, best_of=3)
    assert err.value.param == "best_of" and "max_best_of" in err.value.message


def test_models(client):
    models = client.models.list()
    # The generation model, then the embedding model behind /v1/embeddings.
    assert [m.id for m in models.data] == ["tiny", "sentence-transformers/all-MiniLM-L6-v2"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4o")
    assert err.value.code == "model_not_found"


def test_error_classes(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tgi", messages=MESSAGES, temperature=3)
    assert err.value.param == "temperature" and "temperature" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=5000)
    assert err.value.code == "context_length_exceeded"
    assert "512" in err.value.message and "5000" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tgi", prompt="def f(", suffix="return 1")
    assert err.value.param == "suffix"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tgi", messages=MESSAGES, logit_bias={"99999999": 5})
    assert err.value.param == "logit_bias"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tgi", messages=[{"role": "user", "content": "x " * 600}])
    assert err.value.code == "context_length_exceeded" and "384" in err.value.message
    with pytest.raises(openai.NotFoundError):
        client.post("/nope", cast_to=object, body={})


def test_logit_bias_and_penalties(client, engine):
    token_id = engine.tokenizer.encode(" Paris")[0]
    out = client.completions.create(model="tgi", prompt="Hello", max_tokens=3, temperature=0,
                                    logit_bias={str(token_id): 100})
    assert out.choices[0].text == " Paris" * 3
    # OpenAI's ranges: penalties in [-2, 2].
    out = client.completions.create(model="tgi", prompt="Hello", max_tokens=3, temperature=0, frequency_penalty=2,
                                    presence_penalty=-1)
    assert out.choices[0].finish_reason == "length"


def test_extra_body_and_unknown_fields(client, caplog):
    with caplog.at_level("WARNING", logger="tgi_nb.server"):
        out = client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=3, temperature=0,
                                             extra_body={"top_k": 1, "repetition_penalty": 1.1, "min_p": 0.05,
                                                         "frobnicate": True})
    assert out.choices[0].finish_reason == "length"
    assert any("frobnicate" in r.getMessage() for r in caplog.records)


def test_final_assistant_message_is_continued(client, server):
    base = [{"role": "user", "content": "Say hi"}]
    prefix = "Hello there"
    continued = client.chat.completions.create(
        model="tgi", messages=base + [{"role": "assistant", "content": prefix}], max_tokens=4, temperature=0)
    # Continuing means the prompt ends inside the assistant turn, so the completion is the prompt's
    # continuation: the same as completing the rendered text by hand.
    prompt = httpx.post(server.url + "/chat_tokenize",
                        json={"messages": base + [{"role": "assistant", "content": prefix}]}).json()["templated_text"]
    assert prompt.rstrip().endswith(prefix)
    by_hand = client.completions.create(model="tgi", prompt=prompt, max_tokens=4, temperature=0)
    assert continued.choices[0].message.content == by_hand.choices[0].text


def test_async_client_concurrent_streams(server, engine):
    async def main():
        aclient = AsyncOpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)

        async def one(i: int) -> str:
            stream = await aclient.chat.completions.create(
                model="tgi", messages=[{"role": "user", "content": f"Count to {i}"}], max_tokens=6, stream=True,
                temperature=0)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        texts = await asyncio.gather(*(one(i) for i in range(6)))
        alone = (await aclient.chat.completions.create(
            model="tgi", messages=[{"role": "user", "content": "Count to 3"}], max_tokens=6,
            temperature=0)).choices[0].message.content
        await aclient.close()
        return texts, alone

    texts, alone = asyncio.run(main())
    assert all(texts) and texts[3] == alone  # batching does not change a greedy answer
    assert wait_until(lambda: kv_free(engine))
