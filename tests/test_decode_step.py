"""The fused decode step (tgi_nb/models/decode_step.py, csrc/decode_step.c) against the per-layer path, on every
quantized kernel variant this CPU runs: the same logits and cache writes within rounding, each sequence's logits
independent of the rest of its step, mixed steps split correctly, bad input refused before anything is written."""

from __future__ import annotations

import pytest
import torch

from gguf_fixtures import Q4_K_M, gguf_model, source_file
from tgi_nb.models import quant
from tgi_nb.models.attention import AttentionBatch
from tgi_nb.models.decode_step import FusedDecode
from tgi_nb.models.llama import LlamaModel

BLOCK = 16




def caches(model: LlamaModel, num_blocks: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, BLOCK, model.spec.num_kv_heads, model.spec.head_dim)
    return [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(model.spec.num_layers)]


def clone(kv):
    return [(k.clone(), v.clone()) for k, v in kv]


def decode_batch(contexts: list[int], blocks_per_seq: int):
    """One decode token per sequence at position ``contexts[i]``; sequence i owns blocks i * blocks_per_seq..."""
    tables = torch.stack([torch.arange(blocks_per_seq, dtype=torch.int32) + i * blocks_per_seq
                          for i in range(len(contexts))])
    positions = torch.tensor(contexts)
    slots = torch.tensor([int(tables[i, p // BLOCK]) * BLOCK + p % BLOCK for i, p in enumerate(contexts)])
    batch = AttentionBatch(slot_mapping=slots, num_decodes=len(contexts), decode_block_tables=tables,
                           decode_context_lens=(positions + 1).to(torch.int32), prefills=[])
    return positions, batch


def forward(model, ids, positions, batch, kv, logits_rows, monkeypatch, fused: bool):
    monkeypatch.setenv("TGI_NB_FUSED_DECODE", "1" if fused else "0")
    with torch.inference_mode():
        return model.forward(ids, positions, batch, kv, logits_rows)


@pytest.fixture(scope="module")
def tiny_models(tiny_model_dir, tmp_path_factory):
    """Llama, Qwen2 (q|k|v bias) and Qwen3 (per-head q/k norms) with q8_0 / q4_0 products, a Qwen2 with a
    sliding window of 24 tokens, and llamas of hidden 256 from GGUF files: Q4_K_M (Q4_K and Q6_K blocks, q|k|v
    stacked across the two) and a mix of Q5_K, Q4_K, Q8_0, Q5_0, Q5_1 (q|k|v mixing the two activation families
    of the fast numerics, gate|up stacked across two types)."""
    def load(arch, qtype, **overrides):
        return LlamaModel.load(tiny_model_dir(arch, **overrides), quantize=qtype)

    k_shape = dict(hidden_size=256, head_dim=32, num_attention_heads=8, num_key_value_heads=4)
    src = tiny_model_dir("llama", intermediate_size=512, **k_shape)
    q4_k_m = gguf_model(src, tmp_path_factory.mktemp("q4km"), Q4_K_M)
    mix = gguf_model(src, tmp_path_factory.mktemp("mix"), {"embed": "q8_0", "q_proj": "q5_k", "k_proj": "q5_k",
                                                           "v_proj": "q8_0", "o_proj": "q5_0", "gate_proj": "q5_k",
                                                           "up_proj": "q4_k", "down_proj": "q5_1"})
    return {"llama": load("llama", "q4_0"), "qwen2": load("qwen2", "q8_0"), "qwen3": load("qwen3", "q4_0"),
            "qwen2-window": load("qwen2", "q8_0", use_sliding_window=True, sliding_window=24, max_window_layers=0),
            "llama-q4_k_m": LlamaModel.load(q4_k_m, gguf_file=source_file(q4_k_m)),
            "llama-mix": LlamaModel.load(mix, gguf_file=source_file(mix))}


@pytest.fixture(params=["exact", "fast"])
def numerics(request, tiny_models):
    for model in tiny_models.values():
        model.set_numerics(request.param)
    yield request.param
    for model in tiny_models.values():
        model.set_numerics("exact")


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "qwen2-window", "llama-q4_k_m", "llama-mix"])
def test_fused_step_matches_the_per_layer_path(tiny_models, quant_variant, numerics, name, monkeypatch):
    model = tiny_models[name]
    step = FusedDecode.for_model(model)
    assert step is not None
    contexts = [0, 5, 40, 600, 1100]                 # 600 and 1100: several 512-token parts, merged
    positions, batch = decode_batch(contexts, 72)
    kv = caches(model, 72 * len(contexts))
    ids = torch.tensor([11, 300, 7, 4095, 123])
    rows = torch.arange(len(contexts))
    kv_layered = clone(kv)
    fused = forward(model, ids, positions, batch, kv, rows, monkeypatch, fused=True)
    layered = forward(model, ids, positions, batch, kv_layered, rows, monkeypatch, fused=False)
    assert fused.shape == (5, model.spec.vocab_size) and fused.dtype == torch.float32
    # exact: rounding only; fast: an activation a rounding apart can land on the other side of an int8 step
    tolerance = 1e-4 if numerics == "exact" else 2e-2
    torch.testing.assert_close(fused, layered, rtol=tolerance, atol=tolerance)
    for (k, v), (k2, v2) in zip(kv, kv_layered):
        torch.testing.assert_close(k, k2, rtol=tolerance / 10, atol=tolerance / 10)
        torch.testing.assert_close(v, v2, rtol=tolerance / 10, atol=tolerance / 10)


@pytest.mark.parametrize("name", ["qwen3", "llama-q4_k_m"])
def test_a_sequences_logits_do_not_depend_on_the_rest_of_the_step(tiny_models, quant_variant, numerics, name,
                                                                  monkeypatch):
    model = tiny_models[name]
    contexts = [(37 * i) % 700 for i in range(70)]   # 70 sequences: two calls of 64 and 6
    positions, batch = decode_batch(contexts, 45)
    kv = caches(model, 45 * 70)
    ids = torch.arange(70) * 13
    together = forward(model, ids, positions, batch, clone(kv), torch.arange(70), monkeypatch, fused=True)
    for i in (0, 1, 33, 63, 64, 69):
        alone_pos, alone = decode_batch([contexts[i]], 45)
        alone.decode_block_tables += 45 * i
        alone.slot_mapping = batch.slot_mapping[i:i + 1]
        logits = forward(model, ids[i:i + 1], alone_pos, alone, clone(kv), torch.arange(1), monkeypatch, fused=True)
        assert torch.equal(logits[0], together[i]), i


def test_a_mixed_step_runs_its_decodes_fused_and_its_prefill_per_layer(tiny_models, monkeypatch):
    model = tiny_models["llama"]
    positions, decodes = decode_batch([9, 30], 8)
    kv = caches(model, 24)
    ids = torch.tensor([5, 6])
    prompt = torch.arange(100, 120)
    table = torch.arange(16, 24)
    slots = table[torch.arange(20) // BLOCK] * BLOCK + torch.arange(20) % BLOCK
    mixed = AttentionBatch(slot_mapping=torch.cat([decodes.slot_mapping, slots]), num_decodes=2,
                           decode_block_tables=decodes.decode_block_tables,
                           decode_context_lens=decodes.decode_context_lens, prefills=[(2, 20, 0, None)])
    kv_mixed = clone(kv)
    both = forward(model, torch.cat([ids, prompt]), torch.cat([positions, torch.arange(20)]), mixed, kv_mixed,
                   torch.tensor([0, 1, 21]), monkeypatch, fused=True)
    only_decodes = forward(model, ids, positions, decodes, clone(kv), torch.arange(2), monkeypatch, fused=True)
    prefill = AttentionBatch(slot_mapping=slots, num_decodes=0, decode_block_tables=None, decode_context_lens=None,
                             prefills=[(0, 20, 0, None)])
    only_prefill = forward(model, prompt, torch.arange(20), prefill, clone(kv), torch.tensor([19]), monkeypatch,
                           fused=True)
    assert torch.equal(both[:2], only_decodes) and torch.equal(both[2:], only_prefill)
    # a chunk that samples nothing: no logits rows, no lm_head
    none = forward(model, torch.cat([ids, prompt]), torch.cat([positions, torch.arange(20)]), mixed, clone(kv),
                   torch.tensor([0, 1]), monkeypatch, fused=True)
    assert torch.equal(none, only_decodes)


def test_bad_positions_and_slots_are_refused_before_anything_is_written(tiny_models, monkeypatch):
    model = tiny_models["llama"]
    step = FusedDecode.for_model(model)
    kv = caches(model, 8)
    before = clone(kv)
    positions, batch = decode_batch([3], 8)
    tables, lens = batch.decode_block_tables, batch.decode_context_lens
    for pos, slot, table, ctx in [(3, 8 * BLOCK, tables, lens),               # slot past the cache
                                  (10 ** 6, 3, tables, lens),                 # position past the RoPE table
                                  (3, 3, tables + 100, lens),                 # a block that does not exist
                                  (3, 3, tables, lens + 1000)]:               # context past the block table
        with pytest.raises(ValueError, match="out of range"):
            step.run(torch.tensor([1]), torch.tensor([pos]), torch.tensor([slot]), table, ctx, kv)
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(kv, before))


def test_which_models_and_caches_it_applies_to(tiny_model_dir, tiny_models):
    assert FusedDecode.for_model(LlamaModel.load(tiny_model_dir("llama"))) is None       # float32 weights
    step = FusedDecode.for_model(tiny_models["llama"])
    kv = caches(tiny_models["llama"], 4)
    assert step.usable(kv)
    assert step.usable([(k.half(), v.half()) for k, v in kv])                           # a float16 cache
    assert not step.usable([(k.bfloat16(), v.bfloat16()) for k, v in kv])
    assert not step.usable(kv[:1])                                                      # not one per layer


# The K-quants' activations take one scale per 256 (llama.cpp's Q8_K), coarser than Q8_0's one per 32.
@pytest.mark.parametrize("name,bound", [("qwen3", 0.01), ("llama-q4_k_m", 0.02)])
def test_fast_numerics_stay_close_to_exact(tiny_models, name, bound, monkeypatch):
    model = tiny_models[name]
    positions, batch = decode_batch([3, 100, 700], 50)
    kv = caches(model, 150)
    ids = torch.tensor([10, 20, 30])
    exact = forward(model, ids, positions, batch, clone(kv), torch.arange(3), monkeypatch, fused=True)
    model.set_numerics("fast")
    try:
        fast = forward(model, ids, positions, batch, clone(kv), torch.arange(3), monkeypatch, fused=True)
    finally:
        model.set_numerics("exact")
    assert not torch.equal(fast, exact)                       # int8 activations do change the numbers...
    kld = torch.nn.functional.kl_div(fast.log_softmax(-1), exact.log_softmax(-1), log_target=True, reduction="none")
    assert kld.sum(-1).max() < bound                           # ...but not the distribution


def test_each_call_writes_the_caches_it_is_given(tiny_models, monkeypatch):
    """A regression: cache pointers were kept between calls when the list's id and its first tensor's address
    matched, which a freshly built list can reuse while the other layers' tensors moved (garbage, NaN)."""
    model = tiny_models["qwen3"]
    positions, batch = decode_batch([3, 100, 700], 50)
    kv = caches(model, 150)
    ids = torch.tensor([10, 20, 30])
    first = forward(model, ids, positions, batch, clone(kv), torch.arange(3), monkeypatch, fused=True)
    for _ in range(30):   # each list freed after its call, as the next one is made: ids and addresses get reused
        assert torch.equal(forward(model, ids, positions, batch, clone(kv), torch.arange(3), monkeypatch, fused=True),
                           first)
    fresh = clone(kv)
    forward(model, ids, positions, batch, fresh, torch.arange(3), monkeypatch, fused=True)
    assert all(not torch.equal(k, k0) for (k, _), (k0, _) in zip(fresh, kv))     # every layer's cache written


def test_a_float16_cache_matches_the_per_layer_path(tiny_models, quant_variant, monkeypatch):
    model = tiny_models["qwen2"]
    contexts = [0, 40, 600]
    positions, batch = decode_batch(contexts, 40)
    kv = [(k.half(), v.half()) for k, v in caches(model, 120)]
    ids = torch.tensor([11, 300, 7])
    kv_layered = clone(kv)
    fused = forward(model, ids, positions, batch, kv, torch.arange(3), monkeypatch, fused=True)
    layered = forward(model, ids, positions, batch, kv_layered, torch.arange(3), monkeypatch, fused=False)
    torch.testing.assert_close(fused, layered, rtol=1e-4, atol=1e-4)
    for (k, v), (k2, v2) in zip(kv, kv_layered):
        assert k.dtype == torch.float16
        torch.testing.assert_close(k.float(), k2.float(), rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(v.float(), v2.float(), rtol=1e-3, atol=1e-3)
    for i in range(3):   # alone as in the batch, bit for bit
        alone_pos, alone = decode_batch([contexts[i]], 40)
        alone.decode_block_tables += 40 * i
        alone.slot_mapping = batch.slot_mapping[i:i + 1]
        one = forward(model, ids[i:i + 1], alone_pos, alone, clone(kv_layered), torch.arange(1), monkeypatch,
                      fused=True)
        two = forward(model, ids, positions, batch, clone(kv_layered), torch.arange(3), monkeypatch, fused=True)
        assert torch.equal(one[0], two[i])


def test_numerics_choices_are_validated_and_agree(tiny_models):
    from tgi_nb.engine import EngineConfig
    from tgi_nb.engine.config import NUMERICS_CHOICES
    from tgi_nb.engine.sampling_params import ValidationError

    assert NUMERICS_CHOICES == quant.NUMERICS            # the engine's list is the kernels' list
    with pytest.raises(ValidationError, match="numerics: must be one of exact, fast, got 'turbo'"):
        EngineConfig(numerics="turbo")
    with pytest.raises(ValueError, match="numerics: must be one of exact, fast, got 'int4'"):
        tiny_models["llama"].set_numerics("int4")
    assert tiny_models["llama"].numerics == "exact"
