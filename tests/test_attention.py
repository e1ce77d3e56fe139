"""Paged decode attention: native kernel and torch path against a float64 reference, batch invariance,
fallbacks."""

from __future__ import annotations

import logging
import os
import stat

import pytest
import torch

from tgi_nb.models import attention, native
from tgi_nb.models.attention import (
    native_kernel_available,
    paged_decode_attention,
    paged_decode_attention_reference,
)

# 1 token, exactly one block, one past a block, long (two 512-token parts in the kernel), a few in between
LENS = [1, 16, 17, 700, 33, 128, 5]


def make_case(lens, num_heads=9, kv_heads=3, head_dim=64, block_size=16, dtype=torch.float32, seed=0,
              spare_blocks=7):
    """Random q/caches and block tables over shuffled block ids; tables padded with block 0."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + spare_blocks
    perm = torch.randperm(num_blocks, generator=g).tolist()
    max_blocks = max(need + [1]) + 2
    tables = torch.zeros(len(lens), max_blocks, dtype=torch.int32)
    i = 0
    for b, n in enumerate(need):
        tables[b, :n] = torch.tensor(perm[i:i + n], dtype=torch.int32)
        i += n
    shape = (num_blocks, block_size, kv_heads, head_dim)
    # a spread of magnitudes so softmax is neither flat nor one-hot
    k = (torch.randn(shape, generator=g, dtype=torch.float64) * 1.5).to(dtype)
    v = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    q = (torch.randn(len(lens), num_heads, head_dim, generator=g, dtype=torch.float64) * 1.5).to(dtype)
    return q, k, v, tables, torch.tensor(lens, dtype=torch.int32)


def reference64(q, k, v, tables, lens, scale, window=0):
    return paged_decode_attention_reference(q.double(), k.double(), v.double(), tables, lens, scale, window)


needs_native = pytest.mark.skipif(not native_kernel_available(), reason="native kernel could not be built")


@needs_native
@pytest.mark.parametrize("num_heads,kv_heads", [(4, 4), (9, 3), (8, 2)])
@pytest.mark.parametrize("head_dim", [64, 16, 24, 20])  # 24: vector code, run-time width; 20: scalar code
def test_native_matches_float64_reference(num_heads, kv_heads, head_dim):
    q, k, v, tables, lens = make_case(LENS, num_heads, kv_heads, head_dim)
    scale = head_dim ** -0.5
    out = paged_decode_attention(q, k, v, tables, lens, scale)
    assert out.dtype == torch.float32 and out.shape == q.shape
    torch.testing.assert_close(out.double(), reference64(q, k, v, tables, lens, scale), rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("block_size,head_dim", [(1, 128), (5, 80), (32, 128), (16, 256)])
def test_native_other_block_sizes_and_head_dims(block_size, head_dim):
    q, k, v, tables, lens = make_case([1, 31, 64, 90, 1100], 8, 2, head_dim, block_size=block_size)
    out = paged_decode_attention(q, k, v, tables, lens, 0.1)
    torch.testing.assert_close(out.double(), reference64(q, k, v, tables, lens, 0.1), rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("window", [1, 16, 50, 600, 1000])
def test_native_sliding_window(window):
    q, k, v, tables, lens = make_case(LENS)
    out = paged_decode_attention(q, k, v, tables, lens, 0.125, sliding_window=window)
    ref = reference64(q, k, v, tables, lens, 0.125, window)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    if window == 1:  # one position: the output is exactly the last V row of the group's kv head
        last = lens.long() - 1
        rows = v[tables[torch.arange(len(LENS)), last // 16].long(), last % 16]  # [B, kvh, d]
        torch.testing.assert_close(out, rows.repeat_interleave(3, dim=1), rtol=1e-6, atol=1e-6)


def test_sliding_window_changes_the_result():
    q, k, v, tables, lens = make_case([300])
    full = paged_decode_attention(q, k, v, tables, lens, 0.125)
    windowed = paged_decode_attention(q, k, v, tables, lens, 0.125, sliding_window=64)
    assert not torch.allclose(full, windowed)


@pytest.mark.parametrize("native", [True, False])
def test_zero_context_gives_zeros(native, monkeypatch):
    if not native:
        monkeypatch.setenv("TGI_NB_NATIVE_ATTENTION", "0")
    elif not native_kernel_available():
        pytest.skip("native kernel could not be built")
    q, k, v, tables, _ = make_case([20, 3])
    lens = torch.tensor([0, 3], dtype=torch.int32)
    out = paged_decode_attention(q, k, v, tables, lens, 0.125)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out.double(), reference64(q, k, v, tables, lens, 0.125), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 16), (8, 2, 24)])
@pytest.mark.parametrize("window", [0, 40])
def test_torch_path_float64_matches_reference(num_heads, kv_heads, head_dim, window):
    q, k, v, tables, lens = make_case(LENS, num_heads, kv_heads, head_dim, dtype=torch.float64)
    scale = head_dim ** -0.5
    # float64 is not a native dtype, so the public function takes the torch path
    out = paged_decode_attention(q, k, v, tables, lens, scale, sliding_window=window)
    assert out.dtype == torch.float64
    ref = paged_decode_attention_reference(q, k, v, tables, lens, scale, window)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_on_torch_path(dtype):
    q, k, v, tables, lens = make_case([1, 40, 100], dtype=dtype)
    out = paged_decode_attention(q, k, v, tables, lens, 0.125)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), reference64(q, k, v, tables, lens, 0.125), rtol=2e-2, atol=2e-2)


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_batch_invariance_alone_vs_in_batch_of_16(threads, monkeypatch):
    # With 2 threads a lone sequence is split by kv head and a batch of 16 by sequence: the kernel must give
    # the same bits either way.
    monkeypatch.setattr(attention, "_MIN_ROWS_PER_THREAD", 1)
    # 700 and 1300 span 2 and 3 of the kernel's 512-token parts, merged after the threads finish
    lens = [700, 1, 16, 17, 33, 64, 129, 1300, 3, 90, 500, 48, 15, 31, 200, 77]
    q, k, v, tables, lens_t = make_case(lens, seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        batched = paged_decode_attention(q, k, v, tables, lens_t, 0.125)
        for b in (0, 1, 3, 10, 15):
            alone = paged_decode_attention(q[b:b + 1], k, v, tables[b:b + 1], lens_t[b:b + 1], 0.125)
            assert torch.equal(alone[0], batched[b]), f"sequence {b} changed with the batch"
        # a different batch composition and order, with the tables trimmed to a different width
        order = [15, 0, 7, 3]
        width = max(-(-lens[i] // 16) for i in order)
        sub = paged_decode_attention(q[order], k, v, tables[order, :width].contiguous(), lens_t[order], 0.125)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(sub, batched[order])


@needs_native
@pytest.mark.parametrize("build", ["native", "avx2"])
def test_batch_invariance_small_heads_on_each_build(build, monkeypatch):
    """head_dim 16 (the test models' heads), 2 threads, with the kernel also built for AVX2 (x86-64-v3) where the
    CPU runs it: that build once vectorized the output normalisation over all heads of a work item and gave a lone
    sequence (one kv head per item) other bits than the same sequence in a batch (all kv heads per item)."""
    from tgi_nb.models import quant

    if build == "avx2":
        if "avx2" not in quant.runnable_variants():
            pytest.skip("this CPU does not run AVX2 code")
        monkeypatch.setattr(attention, "_KERNEL", native.NativeFunction(
            "paged_attention", attention._SYMBOL, attention._ARGTYPES, extra_flags=["-march=x86-64-v3"]))
    monkeypatch.setattr(attention, "_MIN_ROWS_PER_THREAD", 1)
    lens = [700, 1, 16, 17, 33, 64, 129, 1300, 3, 90, 500, 48, 15, 31, 200, 77]
    q, k, v, tables, lens_t = make_case(lens, num_heads=4, kv_heads=2, head_dim=16, seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        batched = paged_decode_attention(q, k, v, tables, lens_t, 0.125)
        for b in range(len(lens)):
            alone = paged_decode_attention(q[b:b + 1], k, v, tables[b:b + 1], lens_t[b:b + 1], 0.125)
            assert torch.equal(alone[0], batched[b]), f"sequence {b} changed with the batch"
    finally:
        torch.set_num_threads(before)


@needs_native
def test_bit_identical_with_1_and_2_threads(monkeypatch):
    monkeypatch.setattr(attention, "_MIN_ROWS_PER_THREAD", 1)  # make sure threads really start
    q, k, v, tables, lens = make_case(LENS * 4, seed=5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = paged_decode_attention(q, k, v, tables, lens, 0.125)
        torch.set_num_threads(2)
        two = paged_decode_attention(q, k, v, tables, lens, 0.125)
        torch.set_num_threads(4)  # more threads than cores and than some batches' work items
        four = paged_decode_attention(q, k, v, tables, lens, 0.125)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two) and torch.equal(one, four)


@needs_native
def test_out_argument_is_written_and_returned():
    q, k, v, tables, lens = make_case([10, 40])
    out = torch.full_like(q, float("nan"))
    res = paged_decode_attention(q, k, v, tables, lens, 0.125, out=out)
    assert res is out
    assert torch.equal(out, paged_decode_attention(q, k, v, tables, lens, 0.125))


@needs_native
def test_loading_the_kernel_keeps_denormals():
    # gcc < 13 links crtfastmath.o into -ffast-math shared libraries, which sets flush-to-zero for the whole
    # process; the kernel is linked without it.
    assert native_kernel_available()
    tiny = torch.tensor([1e-39], dtype=torch.float32)
    assert (tiny * 1.0).item() != 0.0


@pytest.mark.parametrize("sdpa_gqa", [True, False])  # False: torch < 2.5, K/V expanded per query head
def test_torch_path_in_chunks_matches_reference(monkeypatch, sdpa_gqa):
    # a budget of a few blocks forces one chunk per sequence or two, empty contexts included
    monkeypatch.setattr(attention, "_TORCH_CHUNK_BYTES", 2 * 3 * 64 * 8 * 48)
    monkeypatch.setattr(attention, "_SDPA_GQA", sdpa_gqa)
    lens = [0, 1, 16, 17, 40, 0, 33, 5]
    q, k, v, tables, lens_t = make_case(lens, dtype=torch.float64)
    for window in (0, 20):
        out = attention._torch_paged_decode_attention(q, k, v, tables, lens_t, 0.125, window)
        ref = paged_decode_attention_reference(q, k, v, tables, lens_t, 0.125, window)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_forced_fallback_env_var(monkeypatch):
    q, k, v, tables, lens = make_case(LENS)
    monkeypatch.setenv("TGI_NB_NATIVE_ATTENTION", "0")

    def boom(*args, **kwargs):
        raise AssertionError("native kernel called although TGI_NB_NATIVE_ATTENTION=0")

    monkeypatch.setattr(attention, "_native", boom)
    assert not native_kernel_available()
    out = paged_decode_attention(q, k, v, tables, lens, 0.125)
    assert torch.equal(out, attention._torch_paged_decode_attention(q, k, v, tables, lens, 0.125, 0))
    torch.testing.assert_close(out.double(), reference64(q, k, v, tables, lens, 0.125), rtol=1e-5, atol=1e-5)


def fresh_kernel(monkeypatch):
    """Give the test a kernel loader that has not built anything yet (the module's own is left as it was)."""
    old = attention._KERNEL
    kernel = native.NativeFunction(old.library, old.symbol, old.argtypes, switch=old.switch)
    monkeypatch.setattr(attention, "_KERNEL", kernel)


def test_no_compiler_warns_once_and_falls_back(monkeypatch, caplog):
    fresh_kernel(monkeypatch)
    monkeypatch.setattr(native, "find_compiler", lambda: None)
    q, k, v, tables, lens = make_case([5, 40])
    with caplog.at_level(logging.WARNING, logger=attention.__name__):
        first = paged_decode_attention(q, k, v, tables, lens, 0.125)
        paged_decode_attention(q, k, v, tables, lens, 0.125)
    assert len([r for r in caplog.records if "compiler" in r.getMessage()]) == 1
    assert not native_kernel_available()
    torch.testing.assert_close(first.double(), reference64(q, k, v, tables, lens, 0.125), rtol=1e-5, atol=1e-5)


def test_broken_build_warns_and_falls_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("TGI_NB_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_PATHS", {})   # as in a fresh process
    fresh_kernel(monkeypatch)
    monkeypatch.setattr(native, "find_compiler", lambda: "/bin/false")
    with caplog.at_level(logging.WARNING, logger=attention.__name__), \
            pytest.warns(native.NativeKernelWarning, match="paged_attention"):   # loud: a notebook shows it
        assert not native_kernel_available()
    assert any("could not build" in r.getMessage() for r in caplog.records)
    assert native.kernel_paths()["paged_attention"].startswith("torch (")    # what /info reports
    assert list((tmp_path / "kernels").iterdir()) == []  # no half-written library left behind


@needs_native
def test_build_into_fresh_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TGI_NB_CACHE", str(tmp_path))
    fresh_kernel(monkeypatch)
    assert native_kernel_available()
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].name.startswith("paged_attention_") and built[0].suffix == ".so"


@needs_native
def test_kernel_cache_is_private_and_loads_only_the_users_own_files(monkeypatch, tmp_path):
    monkeypatch.setenv("TGI_NB_CACHE", str(tmp_path))
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    kernels.chmod(0o777)                                  # as an older version or a shared folder left it
    fresh_kernel(monkeypatch)
    assert native_kernel_available()
    assert stat.S_IMODE(kernels.stat().st_mode) == 0o700
    built, = kernels.glob("*.so")
    built.unlink()                                        # (the loaded library stays mapped)
    built.write_bytes(b"planted by whoever could write it")
    built.chmod(0o666)
    fresh_kernel(monkeypatch)
    assert native_kernel_available()                      # built again rather than loaded
    assert not built.stat().st_mode & 0o022 and built.read_bytes()[:4] == b"\x7fELF"

    # A cache folder that belongs to another user is not used at all: a private folder of this process is.
    monkeypatch.setattr(os, "getuid", lambda real=os.getuid(): real + 1)
    native._process_cache.cache_clear()
    fresh_kernel(monkeypatch)
    assert native_kernel_available()
    private = native._process_cache()
    native._process_cache.cache_clear()
    assert private != kernels and len(list(private.glob("*.so"))) == 1 and len(list(kernels.glob("*.so"))) == 1


@needs_native
def test_invalid_tables_raise_instead_of_reading_out_of_bounds():
    q, k, v, tables, lens = make_case([20, 3])
    bad = tables.clone()
    bad[0, 1] = k.shape[0]  # one past the last block, used by token 16..19
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode_attention(q, k, v, bad, lens, 0.125)
    too_long = torch.tensor([tables.shape[1] * 16 + 1, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="context_lens"):
        paged_decode_attention(q, k, v, tables, too_long, 0.125)


def test_shape_errors_name_the_argument():
    q, k, v, tables, lens = make_case([4])
    with pytest.raises(ValueError, match="num_heads"):
        paged_decode_attention(q[:, :4], k, v, tables, lens, 0.125)
    with pytest.raises(ValueError, match="context_lens"):
        paged_decode_attention(q, k, v, tables, lens[:0], 0.125)
    with pytest.raises(ValueError, match="sliding_window"):
        paged_decode_attention(q, k, v, tables, lens, 0.125, sliding_window=-1)


def test_empty_batch():
    _, k, v, _, _ = make_case([4])
    q = torch.empty(0, 9, 64)
    out = paged_decode_attention(q, k, v, torch.zeros(0, 3, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
                                 0.125)
    assert out.shape == (0, 9, 64)


@needs_native
@pytest.mark.parametrize("head_dim", [64, 16, 24, 20])  # vector code at fixed and run-time widths, scalar code
@pytest.mark.parametrize("window", [0, 50])
def test_float16_cache_matches_float64_reference_of_its_values_and_the_float32_cache(head_dim, window, monkeypatch):
    q, k, v, tables, lens = make_case(LENS, 9, 3, head_dim)
    k16, v16 = k.half(), v.half()
    scale = head_dim ** -0.5
    out = paged_decode_attention(q, k16, v16, tables, lens, scale, window)
    assert out.dtype == torch.float32
    # exact to float32 rounding against the values the cache holds
    torch.testing.assert_close(out.double(), reference64(q, k16, v16, tables, lens, scale, window),
                               rtol=1e-5, atol=1e-5)
    # and within float16's rounding of the float32 cache's answer
    torch.testing.assert_close(out, paged_decode_attention(q, k, v, tables, lens, scale, window), rtol=0, atol=2e-2)
    monkeypatch.setenv("TGI_NB_NATIVE_ATTENTION", "0")
    torch.testing.assert_close(paged_decode_attention(q, k16, v16, tables, lens, scale, window), out,
                               rtol=1e-5, atol=1e-5)


@needs_native
def test_float16_cache_is_batch_invariant():
    q, k, v, tables, lens = make_case(LENS * 2)
    k16, v16 = k.half(), v.half()
    together = paged_decode_attention(q, k16, v16, tables, lens, 0.125)
    for b in (0, 3, 9):
        alone = paged_decode_attention(q[b:b + 1], k16, v16, tables[b:b + 1], lens[b:b + 1], 0.125)
        assert torch.equal(alone[0], together[b])
