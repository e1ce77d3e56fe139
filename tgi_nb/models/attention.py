"""Decode attention over the paged KV cache on CPU.

Three implementations with one signature:

- :func:`paged_decode_attention` — what the engine calls. float32 queries over a float32 or float16 cache run a
  C kernel (``csrc/paged_attention.c``, built once per cache dtype) built at first use with the system compiler
  and called through ctypes; other dtypes, a missing compiler, or ``TGI_NB_NATIVE_ATTENTION=0`` run a torch path
  (gather the blocks of a few sequences at a time, one masked ``scaled_dot_product_attention`` per chunk).
- :func:`paged_decode_attention_reference` — a slow, obviously-correct per-sequence loop, for tests.

The cache of one layer is ``k_cache``/``v_cache`` of shape ``[num_blocks, block_size, num_kv_heads, head_dim]``;
token ``t`` of a sequence lives at ``cache[block_table[t // block_size], t % block_size]``.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native

__all__ = [
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "native_kernel_available",
]

_SYMBOL = "paged_decode_attention_f32"
# Below this many K/V rows (tokens x kv heads) per thread, starting a thread costs more than it saves:
# a pthread start + join measured ~40 us on a 2-core VM, a 64-dim K+V row from cache ~20 ns.
_MIN_ROWS_PER_THREAD = 4096
# Gathered K+V per chunk of the torch path: a few MB stays in L2/L3 between the gather and the attention.
_TORCH_CHUNK_BYTES = 4 << 20
# scaled_dot_product_attention(enable_gqa=...) exists from torch 2.5; before it K/V are expanded per head.
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)

_ARGTYPES = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 7 + [ctypes.c_float] + [ctypes.c_int64] * 3
_KERNEL = native.NativeFunction("paged_attention", _SYMBOL, _ARGTYPES, switch="TGI_NB_NATIVE_ATTENTION")
# The same source built with K/V rows of float16, widened to float32 as they are read.
_KERNEL_F16_CACHE = native.NativeFunction("paged_attention", "paged_decode_attention_f16kv", _ARGTYPES,
                                          extra_flags=["-DKV_HALF"], switch="TGI_NB_NATIVE_ATTENTION")


def _kernel_for(cache_dtype: torch.dtype) -> Optional[native.NativeFunction]:
    # looked up at each call, so that tests can swap a module-level kernel for a fresh one
    return {torch.float32: _KERNEL, torch.float16: _KERNEL_F16_CACHE}.get(cache_dtype)


def native_kernel_available() -> bool:
    """Whether :func:`paged_decode_attention` runs float32 inputs on the native kernel.

    Builds the kernel on first call (a few seconds of compiling, once: the library is cached on disk under
    ``$TGI_NB_CACHE/kernels`` or ``~/.cache/tgi_nb/kernels``). False when ``TGI_NB_NATIVE_ATTENTION=0`` or when
    it cannot be built.

    Example:
        >>> isinstance(native_kernel_available(), bool)
        True
    """
    return _KERNEL.available()


def _check_args(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
                sliding_window: int, out: Optional[Tensor]) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, num_heads, head_dim], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(
            f"k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} must equal k_cache shape {tuple(k_cache.shape)}")
    batch, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache head_dim {k_cache.shape[3]} must equal q head_dim {head_dim}")
    if num_heads % kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({kv_heads})")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [batch={batch}, max_blocks], got shape {tuple(block_tables.shape)}")
    if context_lens.shape != (batch,):
        raise ValueError(f"context_lens must be [batch={batch}], got shape {tuple(context_lens.shape)}")
    if sliding_window < 0:
        raise ValueError(f"sliding_window must be >= 0 (0 = no window), got {sliding_window}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                           context_lens: Tensor, scale: float, sliding_window: int = 0,
                           out: Optional[Tensor] = None) -> Tensor:
    """Attention of one query token per sequence over that sequence's paged K/V.

    Args:
        q: ``[batch, num_heads, head_dim]``.
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]`` of one layer, of q's dtype or
            float16; the current token's K/V must already be written.
        block_tables: int ``[batch, max_blocks_per_seq]``; padding entries may hold any valid block id.
        context_lens: int ``[batch]``, tokens each sequence attends to (0 gives zeros).
        scale: multiplies ``q·k``, usually ``head_dim ** -0.5``.
        sliding_window: when > 0, attend only to the last ``sliding_window`` positions.
        out: optional ``[batch, num_heads, head_dim]`` tensor (same dtype as q) to write into.

    Grouped-query attention: head ``h`` uses kv head ``h // (num_heads // num_kv_heads)``.

    float32 CPU queries with contiguous float32 or float16 caches run the native kernel: each sequence's result
    is bit-identical whatever else is in the batch and however many threads (``torch.get_num_threads()``)
    run. Anything else runs the torch path, which widens a float16 cache to q's dtype as it gathers it.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> k = torch.randn(8, 16, 2, 64, generator=g); v = torch.randn(8, 16, 2, 64, generator=g)
        >>> q = torch.randn(2, 6, 64, generator=g)
        >>> tables = torch.tensor([[3, 1, 0], [7, 2, 5]], dtype=torch.int32)
        >>> lens = torch.tensor([40, 17], dtype=torch.int32)
        >>> o = paged_decode_attention(q, k, v, tables, lens, scale=64 ** -0.5)
        >>> ref = paged_decode_attention_reference(q.double(), k.double(), v.double(), tables, lens, 64 ** -0.5)
        >>> o.shape, torch.allclose(o.double(), ref, atol=1e-5)
        (torch.Size([2, 6, 64]), True)
    """
    _check_args(q, k_cache, v_cache, block_tables, context_lens, sliding_window, out)
    native_kernel = _kernel_for(k_cache.dtype) if q.dtype == torch.float32 else None
    if (
        native_kernel is not None
        and v_cache.dtype == k_cache.dtype
        and q.is_cpu
        and k_cache.is_cpu
        and v_cache.is_cpu
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and (out is None or out.is_contiguous())
        and native_kernel.enabled()
    ):
        kernel = native_kernel.get()
        if kernel is not None:
            return _native(kernel, q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window, out)
    result = _torch_paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window)
    if out is None:
        return result
    out.copy_(result)
    return out


def _native(kernel, q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
            context_lens: Tensor, scale: float, sliding_window: int, out: Optional[Tensor]) -> Tensor:
    # Each conversion is a no-op for the engine's own int32 tensors; checked first because even a no-op
    # .to() costs microseconds and this runs once per layer per step.
    if not q.is_contiguous():
        q = q.contiguous()
    if block_tables.dtype != torch.int32 or not block_tables.is_contiguous() or not block_tables.is_cpu:
        block_tables = block_tables.to(device="cpu", dtype=torch.int32).contiguous()
    if context_lens.dtype != torch.int32 or not context_lens.is_contiguous() or not context_lens.is_cpu:
        context_lens = context_lens.to(device="cpu", dtype=torch.int32).contiguous()
    if out is None:
        out = torch.empty_like(q)
    batch, num_heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    rc = kernel(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), context_lens.data_ptr(),
        out.data_ptr(), batch, num_heads, kv_heads, head_dim, num_blocks, block_size, block_tables.shape[1],
        float(scale), int(sliding_window), torch.get_num_threads(), _MIN_ROWS_PER_THREAD,
    )
    if rc == 1:
        raise ValueError(
            "context_lens must be <= max_blocks * block_size and the used block_tables entries must lie in "
            f"[0, num_blocks={num_blocks})")
    if rc != 0:
        raise MemoryError("native paged attention could not allocate its scratch buffers")
    return out


def _torch_paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                                  context_lens: Tensor, scale: float, sliding_window: int) -> Tensor:
    # Sequences go in chunks of about _TORCH_CHUNK_BYTES of gathered K/V, each chunk one masked SDPA over its
    # gathered blocks. Measured against one gather of the whole batch and against one SDPA per sequence
    # (benchmarks/bench_attention.py, 1 thread), this was fastest or close at every size: the whole-batch
    # gather allocates and page-faults tens of MB per call, the per-sequence loop pays ~10 op dispatches per
    # sequence.
    batch, num_heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    lens = [int(n) for n in context_lens.tolist()]
    starts = [max(0, n - sliding_window) if sliding_window > 0 else 0 for n in lens]
    budget = max(1, _TORCH_CHUNK_BYTES // (2 * kv_heads * head_dim * k_cache.element_size()))  # padded tokens
    b0 = 0
    while b0 < batch:
        first, last = starts[b0] // block_size, -(-lens[b0] // block_size)
        b1 = b0 + 1
        while b1 < batch:
            f, l = min(first, starts[b1] // block_size), max(last, -(-lens[b1] // block_size))
            if (b1 + 1 - b0) * (l - f) * block_size > budget:
                break
            first, last, b1 = f, l, b1 + 1
        _torch_chunk(q[b0:b1], k_cache, v_cache, block_tables[b0:b1, first:last], lens[b0:b1], starts[b0:b1],
                     first * block_size, scale, out[b0:b1])
        b0 = b1
    return out


def _torch_chunk(q: Tensor, k_cache: Tensor, v_cache: Tensor, tables: Tensor, lens: list, starts: list,
                 first_pos: int, scale: float, out: Tensor) -> None:
    batch, num_heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    n_tok = tables.shape[1] * block_size
    if n_tok == 0:  # every context in the chunk is empty
        out.zero_()
        return
    idx = tables.reshape(-1).to(device=k_cache.device, dtype=torch.long)
    # index_select over whole blocks copies contiguous rows; [B, T, kvh, d] viewed as [B, kvh, T, d]
    k = k_cache.view(num_blocks, -1).index_select(0, idx).view(batch, n_tok, kv_heads, head_dim).transpose(1, 2)
    v = v_cache.view(num_blocks, -1).index_select(0, idx).view(batch, n_tok, kv_heads, head_dim).transpose(1, 2)
    group = num_heads // kv_heads
    if k.dtype != q.dtype:  # a float16 cache under float32 queries: widened once gathered
        k, v = k.to(q.dtype), v.to(q.dtype)
    if group > 1 and not _SDPA_GQA:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    gqa = {"enable_gqa": True} if group > 1 and _SDPA_GQA else {}
    q4 = q.reshape(batch, num_heads, 1, head_dim)
    if batch == 1:  # no padding: attend to exactly the window, no mask
        lo, hi = starts[0] - first_pos, lens[0] - first_pos
        o = F.scaled_dot_product_attention(q4, k[:, :, lo:hi], v[:, :, lo:hi], scale=scale, **gqa)
    else:
        pos = torch.arange(first_pos, first_pos + n_tok, device=q.device)
        lens_t = torch.tensor(lens, device=q.device)
        keep = (pos[None, :] < lens_t[:, None]) & (pos[None, :] >= torch.tensor(starts, device=q.device)[:, None])
        o = F.scaled_dot_product_attention(q4, k, v, attn_mask=keep[:, None, None, :], scale=scale, **gqa)
        if 0 in lens:  # a row with nothing to attend to comes out NaN; the contract says zeros
            o = o.masked_fill((lens_t == 0)[:, None, None, None], 0.0)
    out.copy_(o.view(batch, num_heads, head_dim))


def paged_decode_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                                     context_lens: Tensor, scale: float, sliding_window: int = 0,
                                     out: Optional[Tensor] = None) -> Tensor:
    """Same contract as :func:`paged_decode_attention`, written as plainly as possible (a loop over sequences
    and tokens' positions) to check the fast paths against. Computes in the inputs' dtype, so float64 inputs
    give a float64 ground truth.

    Example:
        >>> import torch
        >>> k = torch.zeros(2, 4, 1, 8, dtype=torch.float64); v = torch.arange(64.0).double().reshape(2, 4, 1, 8)
        >>> q = torch.zeros(1, 2, 8, dtype=torch.float64)
        >>> # equal scores: the mean of the V rows of tokens 0..5, i.e. block 1 rows 0-3 then block 0 rows 0-1
        >>> o = paged_decode_attention_reference(q, k, v, torch.tensor([[1, 0]]), torch.tensor([6]), 1.0)
        >>> round(o[0, 0, 0].item(), 4), round(v[[1, 1, 1, 1, 0, 0], [0, 1, 2, 3, 0, 1], 0, 0].mean().item(), 4)
        (30.6667, 30.6667)
    """
    _check_args(q, k_cache, v_cache, block_tables, context_lens, sliding_window, out)
    batch, num_heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // kv_heads
    result = q.new_zeros(q.shape) if out is None else out
    for b in range(batch):
        n = int(context_lens[b])
        start = max(0, n - sliding_window) if sliding_window > 0 else 0
        if n == 0:
            result[b].zero_()
            continue
        pos = torch.arange(start, n)
        blocks = block_tables[b].long()[pos // block_size]
        k = k_cache[blocks, pos % block_size].repeat_interleave(group, dim=1)  # [T, H, d]
        v = v_cache[blocks, pos % block_size].repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,thd->ht", q[b], k) * scale
        probs = torch.softmax(scores, dim=-1)
        result[b] = torch.einsum("ht,thd->hd", probs, v)
    return result


# ----------------------------------------------------------------------------------------------
# One step's attention, shared by our Llama-family forward and transformers' modules (hf_model.py)
# ----------------------------------------------------------------------------------------------

@dataclass(slots=True)
class AttentionBatch:
    """How the packed tokens of one step map onto sequences and the KV cache.

    The batch is laid out decodes first (one token each), then prefill chunks.
    - ``slot_mapping[t]``: the cache slot (block * block_size + offset) that token t's K/V go to.
    - decodes: ``decode_block_tables`` [num_decodes, max_blocks] and ``decode_context_lens``.
    - prefill chunks: per chunk (start in the packed batch, length, tokens already in the cache before
      it, that sequence's block table as a tensor).
    """

    slot_mapping: torch.Tensor
    num_decodes: int
    decode_block_tables: Optional[torch.Tensor]
    decode_context_lens: Optional[torch.Tensor]
    prefills: list[tuple[int, int, int, torch.Tensor]]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           batch: AttentionBatch, scale: float, sliding_window: int = 0, write_kv: bool = True) -> torch.Tensor:
    """Write the step's keys and values ([T, kv_heads, d]) into the paged cache (unless ``write_kv`` is
    False: already written), then attend: decode tokens through the paged decode kernel, prefill chunks
    causally over their cached prefix. Returns [T, heads, d]."""
    num_tokens, nkv, d = k.shape
    if write_kv:
        k_cache.view(-1, nkv, d).index_copy_(0, batch.slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, nkv, d).index_copy_(0, batch.slot_mapping, v.to(v_cache.dtype))
    out = torch.empty(num_tokens, q.shape[1], d, dtype=q.dtype, device=q.device)
    nd = batch.num_decodes
    if nd:
        paged_decode_attention(q[:nd].contiguous(), k_cache, v_cache, batch.decode_block_tables,
                               batch.decode_context_lens, scale, sliding_window, out=out[:nd])
    for start, length, cached, table in batch.prefills:
        out[start:start + length] = _prefill_attention(
            q[start:start + length], k[start:start + length], v[start:start + length],
            k_cache, v_cache, table, cached, scale, sliding_window)
    return out


def _prefill_attention(q, k, v, k_cache, v_cache, block_table, cached: int, scale: float,
                       sliding_window: int) -> torch.Tensor:
    """Causal attention of one prefill chunk ([L, heads, d]) over its sequence's cached prefix plus
    itself. A chunk with nothing before it attends to its own K/V directly, no cache read."""
    length, nh, d = q.shape
    nkv = k.shape[1]
    if cached:
        block_size = k_cache.shape[1]
        total = cached + length
        num_blocks = (total + block_size - 1) // block_size
        blocks = block_table[:num_blocks]
        # a float16 cache is widened to the queries' dtype; this chunk's own rows are exact in k and v, but they
        # are read back rounded, as later decode steps will read them
        k = k_cache[blocks].view(-1, nkv, d)[:total].to(q.dtype)
        v = v_cache[blocks].view(-1, nkv, d)[:total].to(q.dtype)
    qt, kt, vt = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if nkv != nh:
        kt = kt.repeat_interleave(nh // nkv, dim=0)
        vt = vt.repeat_interleave(nh // nkv, dim=0)
    if not cached and not sliding_window:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)
    else:
        q_pos = torch.arange(cached, cached + length, device=q.device)[:, None]
        k_pos = torch.arange(k.shape[0], device=q.device)[None, :]
        mask = k_pos <= q_pos
        if sliding_window:
            mask &= k_pos > q_pos - sliding_window
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)
