"""The native linear kernel (with its fused RMSNorm and silu(gate) * up) and the native RoPE + KV-cache
write, each against its torch path and a float64 reference."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import reference_linear
from tgi_nb.models import linear as linear_module
from tgi_nb.models import rope as rope_module
from tgi_nb.models.linear import linear, native_linear_available
from tgi_nb.models.rope import native_rope_available, rope_and_write_kv

needs_native_linear = pytest.mark.skipif(not native_linear_available(), reason="native linear kernel not built")
needs_native_rope = pytest.mark.skipif(not native_rope_available(), reason="native rope kernel not built")


# rows: 1 (decode), odd and even counts (the kernel pairs rows), the most it takes.
# out features: not a multiple of 4 or of the kernel's 64-column chunks; in features: odd.
@needs_native_linear
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 64])
@pytest.mark.parametrize("out_features,in_features", [(576, 576), (134, 33), (4, 8)])
@pytest.mark.parametrize("fusion", ["plain", "bias+residual", "norm", "norm+silu_mul", "silu_mul+bias"])
def test_native_linear_matches_float64(rows, out_features, in_features, fusion):
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = torch.randn(rows, in_features, generator=g) * 3
    w = torch.randn(out_features, in_features, generator=g) / in_features ** 0.5
    kwargs = {}
    if "bias" in fusion:
        kwargs["bias"] = torch.randn(out_features, generator=g)
    if "residual" in fusion:
        kwargs["residual"] = torch.randn(rows, out_features, generator=g)
    if "norm" in fusion:
        kwargs["norm"] = (torch.rand(in_features, generator=g) + 0.5, 1e-5)
    if "silu_mul" in fusion:
        kwargs["silu_mul"] = True
    out = linear(x, w, **kwargs)
    expected = reference_linear(x, w, **kwargs)
    assert out.shape == expected.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


@needs_native_linear
def test_native_and_torch_linear_paths_agree(monkeypatch):
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(5, 96, generator=g), torch.randn(2 * 80, 96, generator=g) / 10
    norm = (torch.rand(96, generator=g) + 0.5, 1e-6)
    native_out = linear(x, w, norm=norm, silu_mul=True)
    monkeypatch.setenv("TGI_NB_NATIVE_LINEAR", "0")
    assert not native_linear_available()
    torch_out = linear(x, w, norm=norm, silu_mul=True)
    torch.testing.assert_close(native_out, torch_out, rtol=1e-5, atol=1e-5)


def test_linear_residual_aliasing_and_bad_fusion():
    x, w = torch.randn(2, 8), torch.randn(8, 8)
    residual = torch.randn(2, 8)
    expected = x @ w.T + residual
    torch.testing.assert_close(linear(x, w, residual=residual), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="silu_mul"):
        linear(x, w, residual=residual, silu_mul=True)


def test_large_batches_take_the_library_path():
    rows = linear_module.SMALL_GEMM_MAX_ROWS + 1
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(rows, 16, generator=g), torch.randn(12, 16, generator=g)
    norm = (torch.rand(16, generator=g) + 0.5, 1e-6)
    out = linear(x, w, norm=norm, silu_mul=True)
    torch.testing.assert_close(out.double(), reference_linear(x, w, norm=norm, silu_mul=True), rtol=1e-4, atol=1e-4)


def rope_case(num_tokens=5, heads=6, kv_heads=2, head_dim=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, generator=g, dtype=torch.float64).to(dtype)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.arange(64, dtype=torch.float64)[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    positions = torch.tensor([0, 1, 2, 40, 63][:num_tokens])
    slots = torch.tensor([3, 0, 9, 12, 5][:num_tokens])
    caches = (torch.zeros(4, 4, kv_heads, head_dim, dtype=dtype), torch.zeros(4, 4, kv_heads, head_dim, dtype=dtype))
    norms = (torch.rand(head_dim, generator=g, dtype=torch.float64).to(dtype) + 0.5,
             torch.rand(head_dim, generator=g, dtype=torch.float64).to(dtype) + 0.5)
    return qkv, positions, cos, sin, caches, slots, norms


@needs_native_rope
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(6, 2, 16), (4, 4, 64), (3, 1, 10)])
def test_native_rope_matches_torch_path_and_float64(qk_norm, heads, kv_heads, head_dim):
    qkv, positions, cos, sin, (k_cache, v_cache), slots, (q_norm, k_norm) = rope_case(
        heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    norm_args = (q_norm, k_norm) if qk_norm else (None, None)
    # float64 inputs take the torch path: the ground truth
    k64, v64 = k_cache.double(), v_cache.double()
    q_ref, k_ref, v_ref = rope_and_write_kv(qkv.double(), positions, cos.double(), sin.double(), k64, v64, slots,
                                            heads, *(n.double() if n is not None else None for n in norm_args))
    fused = qkv.clone()
    q, k, v = rope_and_write_kv(fused, positions, cos, sin, k_cache, v_cache, slots, heads, *norm_args)
    assert q.data_ptr() == fused.data_ptr()  # the native path works in place
    for got, want in ((q, q_ref), (k, k_ref), (v, v_ref), (k_cache, k64), (v_cache, v64)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # the float32 torch path gives the same to float32 rounding
    k32, v32 = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    q32, _, _ = rope_module._torch_rope_and_write_kv(qkv.clone(), positions, cos, sin, k32, v32, slots, heads,
                                                     *norm_args, 1e-6)
    torch.testing.assert_close(q, q32, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_cache, k32, rtol=1e-6, atol=1e-6)
    assert torch.equal(v_cache, v32)


@needs_native_rope
def test_native_rope_rejects_out_of_range_slots():
    qkv, positions, cos, sin, (k_cache, v_cache), slots, _ = rope_case()
    with pytest.raises(ValueError, match="slot"):
        rope_and_write_kv(qkv, positions, cos, sin, k_cache, v_cache, slots + 100, 6)
    with pytest.raises(ValueError, match="rotary table"):
        rope_and_write_kv(qkv, positions + 64, cos, sin, k_cache, v_cache, slots, 6)


def test_rope_env_switch_takes_the_torch_path(monkeypatch):
    monkeypatch.setenv("TGI_NB_NATIVE_ROPE", "0")
    assert not native_rope_available()
    qkv, positions, cos, sin, (k_cache, v_cache), slots, _ = rope_case()
    original = qkv.clone()
    q, _, _ = rope_and_write_kv(qkv, positions, cos, sin, k_cache, v_cache, slots, 6)
    assert torch.equal(qkv, original)  # the torch path leaves its input alone
    assert q.shape == (5, 6, 16)


def test_weight_arena_packs_aligned_tensors_and_falls_back_when_full():
    from tgi_nb.models.llama import WeightArena

    sizes = [(3, 5), (7,), (2, 2)]
    arena = WeightArena(sum(WeightArena.nbytes(s, torch.float32) for s in sizes[:2]))
    first, second, overflow = (arena.empty(s, torch.float32) for s in sizes)
    assert first.data_ptr() % WeightArena.ALIGN == 0 and second.data_ptr() % WeightArena.ALIGN == 0
    assert second.data_ptr() - first.data_ptr() == WeightArena.nbytes((3, 5), torch.float32)
    first.fill_(1.0)
    second.fill_(2.0)
    assert first.sum().item() == 15 and second.sum().item() == 14  # no overlap
    overflow.fill_(3.0)  # a torch allocation outside the arena, still usable
    assert overflow.shape == (2, 2) and overflow.sum().item() == 12


@needs_native_rope
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(6, 2, 16), (3, 1, 10)])
def test_float16_cache_stores_exactly_what_the_float32_path_rounds_to(qk_norm, heads, kv_heads, head_dim):
    qkv, positions, cos, sin, (k32, v32), slots, (q_norm, k_norm) = rope_case(
        heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    norm_args = (q_norm, k_norm) if qk_norm else (None, None)
    q_full, _, _ = rope_and_write_kv(qkv.clone(), positions, cos, sin, k32, v32, slots, heads, *norm_args)
    k16, v16 = k32.new_zeros(k32.shape, dtype=torch.float16), v32.new_zeros(v32.shape, dtype=torch.float16)
    q_half, k, v = rope_and_write_kv(qkv.clone(), positions, cos, sin, k16, v16, slots, heads, *norm_args)
    # native: q, k, v in float32 as with a float32 cache; the cache holds them rounded to nearest float16
    assert torch.equal(q_half, q_full) and k.dtype == torch.float32
    assert torch.equal(k16, k32.half()) and torch.equal(v16, v32.half())
    # the torch path stores the same bits
    kt, vt = torch.zeros_like(k16), torch.zeros_like(v16)
    rope_module._torch_rope_and_write_kv(qkv.clone(), positions, cos, sin, kt, vt, slots, heads, *norm_args, 1e-6)
    assert torch.equal(kt, k16) and torch.equal(vt, v16)
