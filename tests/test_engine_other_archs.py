"""Architectures outside the Llama family run transformers' modules with our paged attention."""

from __future__ import annotations

import shutil

import pytest
import torch

from engine_helpers import PROMPTS, TransformersReference, assert_same_greedy
from tgi_nb.engine import EngineConfig, LLMEngine, SamplingParams

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _tiny(arch: str, vocab_size: int):
    from transformers import GemmaConfig, Phi3Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if arch == "gemma":  # (1 + w) RMSNorm, scaled embeddings, GeGLU: clearly not our Llama forward
        return GemmaConfig(head_dim=16, **common)
    return Phi3Config(**common)  # fused qkv and gate_up projections


@pytest.fixture(scope="module", params=["gemma", "phi3"])
def tiny_other(request, tmp_path_factory, smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(smollm2_dir))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny(request.param, vocab))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2)
    out = tmp_path_factory.mktemp(request.param)
    model.to(torch.float64).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (smollm2_dir / name).exists():
            shutil.copy2(smollm2_dir / name, out / name)
    return request.param, out


def test_greedy_matches_transformers_batched_and_chunked(tiny_other):
    arch, path = tiny_other
    ref = TransformersReference(path, torch.float64)
    with LLMEngine(EngineConfig(model_id=str(path), dtype="float64", block_size=8,
                                max_batch_prefill_tokens=32)) as engine:
        assert type(engine.model).__name__ == "TransformersModel"
        prompts = [engine.tokenize(p) for p in PROMPTS[:8]]
        results = engine.generate_sync(prompts, SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))
        for ids, result in zip(prompts, results):
            tokens, margins, _ = ref.greedy(ids, 12)
            assert_same_greedy(result.outputs[0].token_ids, tokens, margins, label=arch)
        # prompt log-probabilities through transformers' model (logits of every prompt row, over 2 chunks)
        ids = prompts[0] + prompts[1]
        scored = engine.generate_sync(ids, SamplingParams(max_new_tokens=1, prompt_logprobs=0)).prompt_logprobs
        with torch.inference_mode():
            expected = torch.log_softmax(ref.model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        assert [lp.logprob for lp in scored[1:]] == pytest.approx(
            [float(expected[i - 1, ids[i]]) for i in range(1, len(ids))], abs=1e-4)
        assert engine.stats().kv_blocks_used == 0
