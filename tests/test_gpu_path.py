"""The engine's GPU path on a real GPU (skipped without CUDA, so in CI): the same greedy tokens as the CPU path in
float32 with and without CUDA graphs, the GPU's memory back after shutdown (what pause and scale to zero do), and
a KV cache that cannot fit under cuda_memory_fraction refused with the option named."""

from __future__ import annotations

import gc

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def generate(path, prompts, **config):
    from tgi_nb.engine import EngineConfig, LLMEngine, SamplingParams

    params = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
    with LLMEngine(EngineConfig(model_id=str(path), dtype="float32", max_total_tokens=256, **config)) as engine:
        tokens = [r.outputs[0].token_ids for r in engine.generate_sync(prompts, params)]
        stats = engine.runner.gpu.graphs.stats if engine.runner.gpu is not None else None
    return tokens, stats


def test_greedy_tokens_equal_the_cpu_path_with_and_without_graphs(tiny_model_dir):
    path = tiny_model_dir("llama")
    prompts = [[5, 6, 7, 8], list(range(100, 140)), [42]]
    expected, _ = generate(path, prompts, device="cpu")
    graphed, stats = generate(path, prompts, device="cuda")
    eager, eager_stats = generate(path, prompts, device="cuda", enforce_eager=True)
    assert graphed == expected and eager == expected
    assert stats.replays > 0 and stats.capture_seconds > 0
    assert eager_stats.replays == 0 and eager_stats.eager > 0


def test_shutdown_gives_the_gpu_memory_back(tiny_model_dir):
    from tgi_nb.engine import EngineConfig, LLMEngine, SamplingParams

    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    engine = LLMEngine(EngineConfig(model_id=str(tiny_model_dir("llama")), device="cuda", max_total_tokens=256))
    engine.generate_sync([1, 2, 3], SamplingParams(max_new_tokens=4))
    assert torch.cuda.memory_allocated() > before
    engine.shutdown()   # what an endpoint's pause() and scale_to_zero() call; the object may live on
    assert torch.cuda.memory_allocated() - before < 2**20


def test_a_cache_that_does_not_fit_names_cuda_memory_fraction(tiny_model_dir):
    from tgi_nb.engine import EngineConfig, LLMEngine
    from tgi_nb.engine.capacity import CapacityError

    with pytest.raises(CapacityError, match="cuda_memory_fraction") as info:
        LLMEngine(EngineConfig(model_id=str(tiny_model_dir("llama")), device="cuda", cuda_memory_fraction=1e-6))
    assert info.value.field == "cuda_memory_fraction"
