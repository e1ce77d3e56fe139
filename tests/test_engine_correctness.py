"""Greedy output of the engine is token-identical to transformers: alone, batched, chunked, preempted."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import PROMPTS, TransformersReference, assert_same_greedy
from tgi_nb.engine import EngineConfig, LLMEngine, SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True)


def _engine(model_dir, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model_id=str(model_dir), **kw))


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def tiny64(request, tiny_model_dir):
    """A tiny random model in float64 (exact comparisons) and its transformers reference."""
    path = tiny_model_dir(request.param, dtype=torch.float64)
    return request.param, path, TransformersReference(path, torch.float64)


def _prompt_ids(engine: LLMEngine, prompts: list[str]) -> list[list[int]]:
    return [engine.tokenize(p) for p in prompts]


def _check_batch(engine, ref, prompts, lengths, label, clear_margin=0.0):
    ids = _prompt_ids(engine, prompts)
    results = [None] * len(ids)
    done = []
    for i, (p, n) in enumerate(zip(ids, lengths)):
        # submitted all at once: they run concurrently in the engine
        done.append((i, engine.add_request(p, SamplingParams(max_new_tokens=n, logprobs=0, **GREEDY),
                                           on_output=_collector(results, i))))
    _wait(results)
    for i, (p, n) in enumerate(zip(ids, lengths)):
        tokens, margins, _ = ref.greedy(p, n)
        assert_same_greedy(results[i]["tokens"], tokens, margins, clear_margin, f"{label} prompt {i}")
        assert results[i]["finish"] == "length"


def _collector(results, i):
    import threading

    results[i] = {"tokens": [], "finish": None, "event": threading.Event(), "logprobs": []}

    def on_output(out):
        for d in out.outputs:
            results[i]["tokens"].extend(d.token_ids)
            results[i]["logprobs"].extend(d.logprobs or [])
            results[i]["finish"] = d.finish_reason or results[i]["finish"]
        if out.finished:
            results[i]["event"].set()
    return on_output


def _wait(results, timeout=300):
    for r in results:
        assert r["event"].wait(timeout), "request did not finish"


def test_tiny_one_at_a_time(tiny64):
    arch, path, ref = tiny64
    with _engine(path, dtype="float64") as engine:
        for prompt in PROMPTS[:6]:
            ids = engine.tokenize(prompt)
            ours = engine.generate_sync(ids, SamplingParams(max_new_tokens=24, **GREEDY)).outputs[0].token_ids
            tokens, margins, _ = ref.greedy(ids, 24)
            assert_same_greedy(ours, tokens, margins, label=f"{arch} {prompt[:20]!r}")


def test_tiny_16_concurrent_mixed_lengths(tiny64):
    arch, path, ref = tiny64
    with _engine(path, dtype="float64") as engine:
        _check_batch(engine, ref, PROMPTS, [8 + 3 * i for i in range(16)], f"{arch} batch")
        assert engine.stats().kv_blocks_used == 0


def test_tiny_chunked_prefill(tiny64):
    arch, path, ref = tiny64
    # Prompts longer than the per-step prefill budget are computed in several chunks, interleaved
    # with the decodes of the others.
    with _engine(path, dtype="float64", max_batch_prefill_tokens=24, block_size=8) as engine:
        _check_batch(engine, ref, PROMPTS[4:12], [20] * 8, f"{arch} chunked")
        assert engine.stats().num_steps > 0


def test_tiny_preemption_with_tiny_kv_budget(tiny64):
    arch, path, ref = tiny64
    # 40 blocks of 8 tokens cannot hold 16 sequences at once: the newest get preempted and recomputed.
    with _engine(path, dtype="float64", block_size=8, max_batch_total_tokens=320, max_total_tokens=320,
                 enable_prefix_caching=False) as engine:
        _check_batch(engine, ref, PROMPTS, [40] * 16, f"{arch} preempt")
        stats = engine.stats()
        assert stats.num_preemptions > 0
        assert stats.kv_blocks_used == 0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_float32_native_kernels_match(tiny_model_dir, arch):
    """float32 goes through the native kernels (linear with fused norm and silu, RoPE + KV write with
    qwen2's q|k|v bias and qwen3's q/k norm, decode attention); compare where the margin is clear."""
    path = tiny_model_dir(arch)
    ref = TransformersReference(path, torch.float32)
    with _engine(path) as engine:
        _check_batch(engine, ref, PROMPTS, [16] * 16, f"{arch} fp32", clear_margin=1e-3)


def test_logprobs_match_transformers(tiny_model_dir):
    path = tiny_model_dir("qwen2", dtype=torch.float64)
    ref = TransformersReference(path, torch.float64)
    with _engine(path, dtype="float64") as engine:
        ids = engine.tokenize(PROMPTS[3])
        out = engine.generate_sync(ids, SamplingParams(max_new_tokens=8, logprobs=5, **GREEDY)).outputs[0]
        tokens, _, ref_logprobs = ref.greedy(ids, 8)
        assert out.token_ids == tokens
        for pos, (entry, lp) in enumerate(zip(out.logprobs, ref_logprobs)):
            assert entry.token_id == tokens[pos]
            # The engine returns float32 log-probabilities of the model's logits.
            assert entry.logprob == pytest.approx(float(lp[tokens[pos]]), abs=1e-4)
            top_ids = torch.topk(lp, 5).indices.tolist()
            assert [t.token_id for t in entry.top] == top_ids
            for t in entry.top:
                assert t.logprob == pytest.approx(float(lp[t.token_id]), abs=1e-4)
                assert t.token == engine.tokenizer.decode([t.token_id])


def test_prompt_logprobs_match_transformers(tiny_model_dir):
    """Every prompt token after the first is scored as transformers scores it, also when the prompt is
    prefilled in chunks and when the same prompt already sits in the prefix cache."""
    path = tiny_model_dir("llama", dtype=torch.float64)
    ref = TransformersReference(path, torch.float64)
    with _engine(path, dtype="float64", max_batch_prefill_tokens=16, block_size=8) as engine:
        ids = engine.tokenize(PROMPTS[5] + " " + PROMPTS[6])
        assert len(ids) > 16  # more than one prefill chunk
        with torch.inference_mode():
            expected = torch.log_softmax(ref.model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        engine.generate_sync(ids, SamplingParams(max_new_tokens=2, **GREEDY))  # now in the prefix cache
        result = engine.generate_sync(ids, SamplingParams(max_new_tokens=2, prompt_logprobs=3, **GREEDY))
        scored = result.prompt_logprobs
        assert len(scored) == len(ids) and scored[0] is None
        for position in range(1, len(ids)):
            entry, row = scored[position], expected[position - 1]
            assert entry.token_id == ids[position]
            assert entry.logprob == pytest.approx(float(row[ids[position]]), abs=1e-4)
            assert [t.token_id for t in entry.top] == torch.topk(row, 3).indices.tolist()
        assert result.num_cached_tokens == 0  # computed, not taken from the cache
        assert engine.stats().kv_blocks_used == 0
        plain = engine.generate_sync(ids, SamplingParams(max_new_tokens=2, **GREEDY))
        assert plain.prompt_logprobs is None and plain.outputs[0].token_ids == result.outputs[0].token_ids


@pytest.mark.parametrize("setup", ["single", "batch16"])
def test_smollm2_greedy_matches_transformers(smollm2_dir, setup):
    """The real model in float32: identical tokens wherever transformers' top-2 margin is clear."""
    ref = TransformersReference(smollm2_dir, torch.float32)
    with _engine(smollm2_dir) as engine:
        prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                        add_generation_prompt=True) for p in PROMPTS]
        if setup == "single":
            for prompt in prompts[:3]:
                ids = engine.tokenize(prompt)
                ours = engine.generate_sync(ids, SamplingParams(max_new_tokens=24, **GREEDY)).outputs[0].token_ids
                tokens, margins, _ = ref.greedy(ids, 24)
                assert_same_greedy(ours, tokens, margins, clear_margin=0.05, label=prompt[:40])
        else:
            _check_batch(engine, ref, prompts, [12 + i for i in range(16)], "smollm2 batch", clear_margin=0.05)


def test_smollm2_preemption_and_chunking(smollm2_dir):
    ref = TransformersReference(smollm2_dir, torch.float32)
    with _engine(smollm2_dir, block_size=16, max_batch_total_tokens=192, max_total_tokens=192,
                 max_batch_prefill_tokens=64) as engine:
        _check_batch(engine, ref, PROMPTS[:8], [24] * 8, "smollm2 preempt", clear_margin=0.05)
        assert engine.stats().num_preemptions > 0
        assert engine.stats().kv_blocks_used == 0
