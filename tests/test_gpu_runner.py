"""The GPU path's step runner, run on the CPU (Triton interpreted, the graph runner's stand-in): a tiny random
Llama (Qwen3 with q/k norms, Qwen2 with biases and a sliding window) computes the same logits through it as through
the CPU model runner, over chunked prefills, mixed steps and decode steps padded to their graph bucket; the device
sampler picks the same greedy tokens."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():   # before triton is imported: its own helpers are jitted at import
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from tgi_nb.engine.gpu_runner import GpuStepRunner  # noqa: E402
from tgi_nb.engine.model_runner import ModelRunner, allocate_kv_caches  # noqa: E402
from tgi_nb.engine.sampler import sample  # noqa: E402
from tgi_nb.engine.sampling_params import SamplingParams  # noqa: E402
from tgi_nb.engine.sequence import Request, Sequence  # noqa: E402
from tgi_nb.models.llama import LlamaModel  # noqa: E402

BLOCK, NUM_BLOCKS = 16, 12


def make_seq(prompt: list[int], blocks: list[int]) -> Sequence:
    seq = Sequence(Request("r", prompt, SamplingParams(temperature=0), lambda _: None, 0.0), 0, list(prompt),
                   None, None)
    seq.block_table = blocks
    return seq


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("qwen3", {}),
                                            ("qwen2", {"use_sliding_window": True, "sliding_window": 8})])
def test_same_logits_and_tokens_as_the_cpu_runner(tiny_model_dir, arch, overrides):
    model = LlamaModel.load(tiny_model_dir(arch, **overrides), dtype=torch.float32)
    assert model.spec.sliding_window == overrides.get("sliding_window", 0)
    cpu = ModelRunner(model, NUM_BLOCKS, BLOCK)
    spec = model.spec
    caches = allocate_kv_caches(spec.num_layers, (NUM_BLOCKS + 1, BLOCK, spec.num_kv_heads, spec.head_dim),
                                torch.float32, torch.device("cpu"))
    gpu = GpuStepRunner(model, caches, BLOCK, max_num_seqs=8, max_model_len=NUM_BLOCKS * BLOCK,
                        pad_slot=NUM_BLOCKS * BLOCK)
    gpu.capture()
    g = torch.Generator().manual_seed(0)
    a = make_seq(torch.randint(3, 40000, (20,), generator=g).tolist(), [4, 0, 7])
    b = make_seq(torch.randint(3, 40000, (30,), generator=g).tolist(), [2, 9, 5, 1])
    c = make_seq(torch.randint(3, 40000, (5,), generator=g).tolist(), [11])

    from tgi_nb.engine.scheduler import SchedulerOutput

    steps = [([], [(a, 20), (b, 16)]), ([a], [(b, 14), (c, 5)])] + [([a, b, c], [])] * 4
    for decodes, prefills in steps:
        inputs = cpu.prepare(SchedulerOutput(decodes=list(decodes), prefills=list(prefills)))
        expected = model.forward(inputs.input_ids, inputs.positions, inputs.batch, cpu.kv_caches,
                                 inputs.logits_indices)
        sampling = inputs.sampling
        result = gpu.execute(SchedulerOutput(decodes=list(decodes), prefills=list(prefills)))
        assert result.sampling == sampling and result.num_rows == len(sampling)
        torch.testing.assert_close(result.logits, expected, rtol=1e-4, atol=1e-4)
        tokens = [t.token_id for t in gpu.sample(result)]
        assert tokens == [t.token_id for t in sample(expected, sampling)]
        for seq in decodes:
            seq.num_computed_tokens += 1
        for seq, n in prefills:
            seq.num_computed_tokens += n
        for seq, token in zip(sampling, tokens):
            seq.append_token(token)
    # the four decode steps of three sequences went through the bucket of 4, one padding row each
    assert gpu.graphs.stats.replays == 4 and gpu.graphs.stats.buckets == {4: 4}
    assert gpu.graphs.stats.padded_rows == 4


def test_the_engine_through_the_gpu_path_on_the_cpu(tiny_model_dir, monkeypatch):
    """LLMEngine with TGI_NB_GPU_PATH=1 runs every step through GpuStepRunner (Triton interpreted): the same greedy
    tokens, log-probabilities and prompt log-probabilities as the CPU path, forks of ``n`` included; a seeded
    request gives the same tokens alone and beside others."""
    from tgi_nb.engine import EngineConfig, LLMEngine

    config = EngineConfig(model_id=str(tiny_model_dir("llama")), device="cpu", max_total_tokens=128, max_num_seqs=8)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 40000, (n,), generator=g).tolist() for n in (5, 23, 40)]
    greedy = SamplingParams(max_new_tokens=6, temperature=0, logprobs=2, prompt_logprobs=1, ignore_eos=True, n=2)

    def run(engine):
        return [[(o.token_ids, [lp.logprob for lp in o.logprobs]) for o in r.outputs]
                for r in engine.generate_sync(prompts, greedy)], engine.generate_sync(prompts[1], greedy)

    with LLMEngine(config) as engine:
        assert engine.runner.gpu is None
        expected, expected_prompt = run(engine)
    monkeypatch.setenv("TGI_NB_GPU_PATH", "1")
    with LLMEngine(config) as engine:
        assert engine.runner.gpu is not None
        got, got_prompt = run(engine)
        seeded = SamplingParams(max_new_tokens=8, temperature=0.8, seed=11, ignore_eos=True)
        alone = engine.generate_sync(prompts[0], seeded).outputs[0].token_ids
        beside = engine.generate_sync([prompts[2], prompts[0], prompts[1]], seeded)[1].outputs[0].token_ids
        assert engine.runner.gpu.graphs.stats.replays > 0
    assert [[t for t, _ in r] for r in got] == [[t for t, _ in r] for r in expected]
    for r_got, r_expected in zip(got, expected):
        for (_, lp_got), (_, lp_expected) in zip(r_got, r_expected):
            assert lp_got == pytest.approx(lp_expected, abs=1e-4)
    assert [p.logprob if p else None for p in got_prompt.prompt_logprobs] == pytest.approx(
        [p.logprob if p else None for p in expected_prompt.prompt_logprobs], abs=1e-4)
    assert alone == beside
