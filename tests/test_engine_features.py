"""Engine behaviour: sampling, stops, n, logprobs, aborts, prefix caching, validation, isolation."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from engine_helpers import PROMPTS
from server_fixtures import wait_until
from tgi_nb.engine import EngineConfig, LLMEngine, SamplingParams, ValidationError
from tgi_nb.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    path = tiny_model_dir("llama")
    with LLMEngine(EngineConfig(model_id=str(path), block_size=8, max_total_tokens=1024)) as eng:
        yield eng


def _wait_idle(engine, timeout=60):
    """Aborts are processed by the engine thread: wait until it has caught up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        if s.num_requests == 0 and s.kv_blocks_used == 0:
            return s
        time.sleep(0.02)
    return engine.stats()


def test_seeded_sampling_is_independent_of_batch(engine):
    params = SamplingParams(max_new_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = engine.generate_sync(PROMPTS[2], params).outputs[0].token_ids
    again = engine.generate_sync(PROMPTS[2], params).outputs[0].token_ids
    assert alone == again
    # the seeded request shares every step with 7 unseeded ones of other lengths
    batch = engine.generate_sync([PROMPTS[2]] + PROMPTS[5:12], params)
    assert batch[0].outputs[0].token_ids == alone
    unseeded = engine.generate_sync(PROMPTS[2], SamplingParams(max_new_tokens=20, temperature=0.9,
                                                               ignore_eos=True))
    assert len(unseeded.outputs[0].token_ids) == 20


def test_different_seeds_differ(engine):
    a = engine.generate_sync(PROMPTS[1], SamplingParams(max_new_tokens=16, temperature=1.0, seed=1, ignore_eos=True))
    b = engine.generate_sync(PROMPTS[1], SamplingParams(max_new_tokens=16, temperature=1.0, seed=2, ignore_eos=True))
    assert a.outputs[0].token_ids != b.outputs[0].token_ids


def test_n_samples_share_prompt_and_differ(engine):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7, n=4, logprobs=2, ignore_eos=True)
    result = engine.generate_sync(PROMPTS[4], params)
    assert [o.index for o in result.outputs] == [0, 1, 2, 3]
    assert all(len(o.token_ids) == 12 and len(o.logprobs) == 12 for o in result.outputs)
    assert len({tuple(o.token_ids) for o in result.outputs}) > 1
    # sample i is the same as a single request seeded with seed + i
    single = engine.generate_sync(PROMPTS[4], SamplingParams(max_new_tokens=12, temperature=1.0, seed=9,
                                                             ignore_eos=True))
    assert single.outputs[0].token_ids == result.outputs[2].token_ids
    assert _wait_idle(engine).kv_blocks_used == 0


def test_n_greedy_samples_are_identical(engine):
    result = engine.generate_sync(PROMPTS[0], SamplingParams(max_new_tokens=10, temperature=0, n=3,
                                                             ignore_eos=True))
    assert len({tuple(o.token_ids) for o in result.outputs}) == 1


def _greedy_text(engine, prompt, n=30):
    return engine.generate_sync(prompt, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)
                                ).outputs[0]


def test_stop_string_spanning_tokens_is_cut_and_never_streamed(engine):
    full = _greedy_text(engine, PROMPTS[3])
    tokens = full.token_ids
    # a stop string made of the end of one token and the start of the next ones
    pieces = [engine.tokenizer.decode(tokens[:i]) for i in range(len(tokens) + 1)]
    start = len(pieces[5]) - 1 if len(pieces[5]) > 1 else len(pieces[5])
    stop = full.text[start:start + max(3, len(pieces[8]) - start)]
    assert stop and stop in full.text
    expected = full.text[:full.text.index(stop)]
    streamed = []
    for out in engine.stream(PROMPTS[3], SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True,
                                                        stop=[stop])):
        for d in out.outputs:
            streamed.append(d.text)
            last = d
    assert "".join(streamed) == expected
    assert stop not in "".join(streamed)
    assert last.finish_reason == "stop" and last.stop_reason == stop


def test_stop_token_ids_and_eos(engine):
    full = _greedy_text(engine, PROMPTS[6], 12)
    stop_token = full.token_ids[5]
    out = engine.generate_sync(PROMPTS[6], SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True,
                                                          stop_token_ids=[stop_token])).outputs[0]
    first = full.token_ids.index(stop_token)
    assert out.token_ids == full.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_token
    # without ignore_eos, an EOS id ends the sample (EOS is 2 for the tiny models)
    eos_engine_ids = engine.eos_token_ids
    assert 2 in eos_engine_ids


def test_max_new_tokens_gives_length(engine):
    out = _greedy_text(engine, PROMPTS[0], 5)
    assert out.finish_reason == "length" and len(out.token_ids) == 5


def test_penalties_follow_openai_semantics(engine):
    """frequency/presence penalties subtract count * f + p from generated tokens' logits."""
    base = _greedy_text(engine, PROMPTS[8], 24)
    repeated = max(set(base.token_ids), key=base.token_ids.count)
    if base.token_ids.count(repeated) < 2:
        pytest.skip("greedy output has no repetition to penalise")
    penalised = engine.generate_sync(PROMPTS[8], SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True,
                                                                frequency_penalty=2.0, presence_penalty=2.0))
    assert penalised.outputs[0].token_ids.count(repeated) < base.token_ids.count(repeated)


def test_logit_bias_forces_a_token(engine):
    out = engine.generate_sync(PROMPTS[1], SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True,
                                                          logit_bias={42: 100.0})).outputs[0]
    assert out.token_ids == [42] * 4


def test_logit_bias_tensors_are_built_once_per_request(monkeypatch):
    """A logit_bias map is turned into tensors when the request arrives, not at each step of each sample."""
    import torch

    from tgi_nb.engine import sampler
    from tgi_nb.engine.sequence import Request, Sequence

    request = Request("r", [1, 2], SamplingParams(logit_bias={3: 5.0, 7: -5.0}, n=2), lambda out: None, 0.0)
    seqs = [Sequence(request, i, [1, 2], IncrementalDetokenizer(None, [1, 2]), None) for i in range(2)]
    built = []
    real_tensor = torch.tensor
    monkeypatch.setattr(sampler.torch, "tensor", lambda *a, **k: built.append(a) or real_tensor(*a, **k))
    for step in range(3):
        rows = [sampler._apply_penalties(torch.zeros(8), seq) for seq in seqs]
    assert built == []
    assert all(row.tolist() == [0, 0, 0, 5, 0, 0, 0, -5] for row in rows)


def test_logits_processor_hook_and_failure_isolated(engine):
    seen = []

    def only_even(generated, logits):
        seen.append(len(generated))
        logits[1::2] = float("-inf")
        return logits

    out = engine.generate_sync(PROMPTS[1], SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True,
                                                          logits_processor=only_even)).outputs[0]
    assert all(t % 2 == 0 for t in out.token_ids) and seen == list(range(6))

    def broken(generated, logits):
        raise RuntimeError("boom")

    results = engine.generate_sync([PROMPTS[1], PROMPTS[2]], SamplingParams(max_new_tokens=6, temperature=0,
                                                                            ignore_eos=True))
    bad = engine.generate_sync(PROMPTS[1], SamplingParams(max_new_tokens=6, logits_processor=broken))
    assert bad.outputs[0].finish_reason == "error"
    # the engine keeps serving
    again = engine.generate_sync([PROMPTS[1], PROMPTS[2]], SamplingParams(max_new_tokens=6, temperature=0,
                                                                          ignore_eos=True))
    assert [r.outputs[0].token_ids for r in again] == [r.outputs[0].token_ids for r in results]


def test_abort_frees_blocks(engine):
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=500, ignore_eos=True)) for p in PROMPTS[:6]]
    assert wait_until(lambda: engine.stats().kv_blocks_used > 0)
    for rid in ids:
        engine.abort(rid)
    stats = _wait_idle(engine)
    assert stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0


def test_stream_closed_early_aborts(engine):
    gen = engine.stream(PROMPTS[2], SamplingParams(max_new_tokens=500, ignore_eos=True))
    next(gen)
    gen.close()
    assert _wait_idle(engine).kv_blocks_used == 0


def test_async_generate_and_cancel(engine):
    async def main():
        texts = []
        async for out in engine.generate(PROMPTS[1], SamplingParams(max_new_tokens=8, temperature=0,
                                                                    ignore_eos=True)):
            texts.extend(d.text for d in out.outputs)
        agen = engine.generate(PROMPTS[2], SamplingParams(max_new_tokens=500, ignore_eos=True))

        started = asyncio.Event()

        async def consume():
            async for _ in agen:
                started.set()
        task = asyncio.create_task(consume())
        await started.wait()  # cancelled mid-generation, whatever the machine's speed
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await agen.aclose()
        return "".join(texts)

    text = asyncio.run(main())
    assert text == _greedy_text(engine, PROMPTS[1], 8).text
    assert _wait_idle(engine).kv_blocks_used == 0


def test_prefix_cache_hit_computes_fewer_prompt_tokens(engine):
    system = "You are a helpful assistant who answers in one sentence. " * 8
    first = engine.stats()
    engine.generate_sync(system + "What is 2+2?", SamplingParams(max_new_tokens=2))
    mid = engine.stats()
    r = engine.generate_sync(system + "What is 3+3?", SamplingParams(max_new_tokens=2))
    last = engine.stats()
    computed_first = mid.prompt_tokens_total - first.prompt_tokens_total
    computed_second = last.prompt_tokens_total - mid.prompt_tokens_total
    assert r.num_cached_tokens > 0
    assert last.prefix_cache_hit_tokens - mid.prefix_cache_hit_tokens == r.num_cached_tokens
    assert computed_second < computed_first - 40
    assert computed_second == len(r.prompt_token_ids) - r.num_cached_tokens


def test_validation_errors_name_the_field(engine):
    with pytest.raises(ValidationError) as e:
        SamplingParams(top_p=1.5)
    assert e.value.field == "top_p" and "(0, 1]" in str(e.value)
    for kwargs, field in [(dict(temperature=-0.1), "temperature"), (dict(max_new_tokens=0), "max_new_tokens"),
                          (dict(logprobs=21), "logprobs"), (dict(prompt_logprobs=-1), "prompt_logprobs"),
                          (dict(n=0), "n"), (dict(top_k=-1), "top_k"),
                          (dict(frequency_penalty=3), "frequency_penalty"), (dict(logit_bias={1: 500}), "logit_bias")]:
        with pytest.raises(ValidationError) as e:
            SamplingParams(**kwargs)
        assert e.value.field == field
    with pytest.raises(ValidationError) as e:
        engine.add_request("hi " * 2000, SamplingParams())
    assert e.value.field == "prompt" and "1023" in str(e.value)
    with pytest.raises(ValidationError) as e:
        engine.add_request("hi", SamplingParams(max_new_tokens=5000))
    assert e.value.field == "max_new_tokens" and "1024" in str(e.value)
    with pytest.raises(ValidationError) as e:
        engine.add_request([1, 2, 10**9], SamplingParams())
    assert e.value.field == "prompt"
    with pytest.raises(ValidationError):
        EngineConfig(max_input_tokens=100, max_total_tokens=100)
    assert engine.stats().num_requests == 0


def test_concurrent_callers_from_threads(engine):
    outs = {}

    def worker(i):
        outs[i] = engine.generate_sync(PROMPTS[i], SamplingParams(max_new_tokens=10, temperature=0,
                                                                  ignore_eos=True)).outputs[0].token_ids
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        assert outs[i] == _greedy_text(engine, PROMPTS[i], 10).token_ids


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize("text", ["Hello world, how are you?", " leading spaces  and  doubles",
                                  "émigré café naïve — “quotes” 日本語 😀🎉 done", "\n\nline\tbreaks\n"])
def test_incremental_detokenizer_matches_full_decode(tokenizer, text):
    prompt = tokenizer.encode("Say:")
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.add_token(t) for t in ids]
    detok.flush()
    assert "".join(pieces) == detok.text
    assert detok.text == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_held_back_stop_prefix_is_the_longest_one_as_text_grows(tokenizer):
    """The overlap is followed character by character (no slice per prefix length): it must equal, after each
    piece of text, the longest prefix of any stop string that ends the text (a direct check), stop strings with
    repeats (KMP's borders) included, and after a cut at a matched stop string."""
    import random

    rng = random.Random(0)
    for _ in range(300):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 8))) for _ in range(rng.randint(1, 4))]
        detok = IncrementalDetokenizer(tokenizer, [], stop=stops)
        for _ in range(rng.randint(1, 12)):
            detok.text += "".join(rng.choice("abc") for _ in range(rng.randint(0, 5)))
            if rng.random() < 0.1:
                detok.text = detok.text[:rng.randint(0, len(detok.text))]      # as check_stop cuts it
            expected = max((k for s in stops for k in range(len(s)) if detok.text.endswith(s[:k])), default=0)
            assert detok._stop_prefix_overlap() == expected, (stops, detok.text)


def test_detokenizer_holds_back_partial_stop(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], stop=["STOP"])
    emitted = ""
    for t in tokenizer.encode("abc ST"):
        n = len(detok.add_token(t))
        assert detok.check_stop(n) is None
        emitted += detok.take_output(final=False)
    assert emitted == "abc "
    for t in tokenizer.encode("OP tail"):
        n = len(detok.add_token(t))
        if detok.check_stop(n):
            break
    assert emitted + detok.take_output(final=True) == "abc "
