"""The GPU path's Triton paged attention, run by Triton's interpreter on the CPU, against the float64 reference of
tgi_nb.models.attention: decodes, prefill chunks over a cached prefix and both in one launch; GQA, sliding window,
block sizes and head sizes that are not powers of two; float32, float16 and bfloat16 queries and caches."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():   # before triton is imported: its own helpers are jitted at import
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from tgi_nb.models.attention import paged_decode_attention_reference  # noqa: E402
from tgi_nb.models.triton_attention import paged_attention  # noqa: E402


def make_step(chunks, num_heads=8, kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32,
              cache_dtype=None, seed=0):
    """A step of sequences given as (tokens cached before, query tokens now): random caches, block tables over
    shuffled block ids, and the packed queries."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-(cached + n) // block_size) for cached, n in chunks]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(chunks), max(need + [1]) + 1, dtype=torch.int32)
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = torch.tensor(perm[used:used + n], dtype=torch.int32)
        used += n
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k = (torch.randn(shape, generator=g, dtype=torch.float64) * 1.5).to(cache_dtype or dtype)
    v = torch.randn(shape, generator=g, dtype=torch.float64).to(cache_dtype or dtype)
    num_tokens = sum(n for _, n in chunks)
    q = (torch.randn(num_tokens, num_heads, head_dim, generator=g, dtype=torch.float64) * 1.5).to(dtype)
    seq_lens = torch.tensor([cached + n for cached, n in chunks], dtype=torch.int32)
    starts = torch.tensor([0] + [n for _, n in chunks], dtype=torch.int32).cumsum(0).to(torch.int32)
    return q, k, v, tables, seq_lens, starts


def reference(q, k, v, tables, seq_lens, starts, scale, window=0):
    """Each query token as a decode whose context ends at its own position (what causal attention means)."""
    rows, lens = [], []
    for i in range(seq_lens.shape[0]):
        n = int(starts[i + 1] - starts[i])
        for j in range(n):
            rows.append(i)
            lens.append(int(seq_lens[i]) - n + j + 1)
    return paged_decode_attention_reference(q.double(), k.double(), v.double(), tables[rows],
                                            torch.tensor(lens), scale, window)


MIXED = [(40, 1), (0, 1), (15, 1), (16, 1), (0, 23), (37, 9), (5, 40)]   # decodes first, then prefill chunks


@pytest.mark.parametrize("num_heads,kv_heads", [(4, 4), (9, 3), (12, 2)])
def test_mixed_step_matches_reference_float32(num_heads, kv_heads):
    q, k, v, tables, lens, starts = make_step(MIXED, num_heads, kv_heads)
    out = paged_attention(q, k, v, tables, lens, starts, 0.125)
    torch.testing.assert_close(out.double(), reference(q, k, v, tables, lens, starts, 0.125), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_size,head_dim", [(1, 16), (5, 80), (32, 128), (16, 24)])
def test_block_sizes_and_head_dims(block_size, head_dim):
    q, k, v, tables, lens, starts = make_step(MIXED, 6, 2, head_dim, block_size, seed=1)
    out = paged_attention(q, k, v, tables, lens, starts, head_dim ** -0.5)
    ref = reference(q, k, v, tables, lens, starts, head_dim ** -0.5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_decode_only_tile_matches_the_general_one():
    chunks = [(n, 1) for n in (1, 16, 17, 300, 33)]
    q, k, v, tables, lens, starts = make_step(chunks, 9, 3, seed=2)
    decode = paged_attention(q, k, v, tables, lens, starts, 0.125, max_query_len=1)
    general = paged_attention(q, k, v, tables, lens, starts, 0.125)
    torch.testing.assert_close(decode.double(), reference(q, k, v, tables, lens, starts, 0.125), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(decode, general, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("window", [1, 7, 100])
def test_sliding_window(window):
    q, k, v, tables, lens, starts = make_step(MIXED + [(90, 30)], 8, 2, seed=3)
    out = paged_attention(q, k, v, tables, lens, starts, 0.125, sliding_window=window)
    ref = reference(q, k, v, tables, lens, starts, 0.125, window)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("dtype,cache_dtype", [
    (torch.float16, torch.float16), (torch.float32, torch.float16), (torch.float16, torch.float32),
    (torch.float32, torch.bfloat16),
    pytest.param(torch.bfloat16, torch.bfloat16, marks=pytest.mark.skipif(
        INTERPRETED, reason="Triton's interpreter computes with numpy, which has no bfloat16 products")),
])
def test_half_precision(dtype, cache_dtype):
    q, k, v, tables, lens, starts = make_step(MIXED, 8, 2, dtype=dtype, cache_dtype=cache_dtype, seed=4)
    out = paged_attention(q, k, v, tables, lens, starts, 0.125)
    assert out.dtype == dtype
    # the reference computes in float64 from the same rounded inputs; the kernel rounds P and the output
    tol = 2e-2 if torch.bfloat16 in (dtype, cache_dtype) else 5e-3
    torch.testing.assert_close(out.double(), reference(q, k, v, tables, lens, starts, 0.125), rtol=tol, atol=tol)


def test_each_sequence_is_independent_of_its_neighbours():
    """A sequence's rows are bit-identical alone and in a batch (what a seeded or greedy request relies on)."""
    q, k, v, tables, lens, starts = make_step(MIXED, 8, 2, seed=5)
    together = paged_attention(q, k, v, tables, lens, starts, 0.125)
    for i in (0, 4, 6):
        a, b = int(starts[i]), int(starts[i + 1])
        alone = paged_attention(q[a:b].contiguous(), k, v, tables[i:i + 1], lens[i:i + 1],
                                torch.tensor([0, b - a], dtype=torch.int32), 0.125)
        assert torch.equal(alone, together[a:b])


def test_padding_rows_give_zeros_and_write_nothing_else():
    """A CUDA graph's padded rows (context 0) come out as zeros; ``out`` is written in place."""
    chunks = [(20, 1), (3, 1)]
    q, k, v, tables, lens, starts = make_step(chunks, 4, 2, seed=6)
    q = torch.cat([q, torch.randn(2, 4, 64)])
    lens = torch.cat([lens, torch.zeros(2, dtype=torch.int32)])
    starts = torch.arange(5, dtype=torch.int32)
    tables = torch.cat([tables, torch.zeros(2, tables.shape[1], dtype=torch.int32)])
    out = torch.full_like(q, float("nan"))
    result = paged_attention(q, k, v, tables, lens, starts, 0.125, max_query_len=1, out=out)
    assert result is out
    assert torch.equal(out[2:], torch.zeros(2, 4, 64))
    torch.testing.assert_close(out[:2].double(), reference(q[:2], k, v, tables[:2], lens[:2], starts[:3], 0.125),
                               rtol=1e-5, atol=1e-5)


def test_argument_errors_name_the_field():
    q, k, v, tables, lens, starts = make_step([(3, 1)], 6, 4)
    with pytest.raises(ValueError, match="num_heads"):
        paged_attention(q, k, v, tables, lens, starts, 0.1)
    q, k, v, tables, lens, starts = make_step([(3, 1)], 4, 2)
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_attention(q, k, v, tables, lens, starts[:1], 0.1)
    with pytest.raises(ValueError, match="block_tables"):
        paged_attention(q, k, v, tables[0], lens, starts, 0.1)
