"""Paged attention for the GPU path: one Triton launch per layer for a whole step, decodes and prefill chunks.

The step's query tokens are packed (sequence ``i`` owns ``q[query_start_loc[i]:query_start_loc[i + 1]]``); each
sequence's keys and values are read where they are, in the paged cache of ``tgi_nb.models.attention``
(``[num_blocks, block_size, num_kv_heads, head_dim]``, token ``t`` at ``cache[block_table[t // block_size],
t % block_size]``), written before the call. A decode is a sequence with one query token; a prefill chunk with a
cached prefix is one with several, whose last token sits at position ``seq_lens[i] - 1``. The mask is causal,
optionally within a sliding window.

How the work is cut (the layout vLLM's and SGLang's Triton backends use): a program takes one kv head and a tile
of ``BLOCK_M`` rows, each a (query token, query head of that kv head's group) pair, so that grouped-query heads
share every K/V tile they load, and walks the sequence's keys in tiles of ``TILE_N`` positions with an online
softmax in float32. The grid, ``(num_tokens // BLOCK_Q + num_seqs, num_kv_heads)``, depends only on the number of
tokens and sequences, never on their lengths, so a decode step can be captured in a CUDA graph; programs past the
end of their sequence return at once.

Triton is imported on first use, so the package works without it. Without CUDA the kernel runs in Triton's
interpreter (``TRITON_INTERPRET=1``, set here when no GPU is present): slow, but the same code, which is how the
tests check it on the CPU against :func:`tgi_nb.models.attention.paged_decode_attention_reference`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["PagedBatch", "attend_paged", "paged_attention", "triton_available"]

# Rows of a program's tile when every sequence has one query token: the smallest tile tl.dot takes.
_DECODE_BLOCK_M = 16
# Rows when prefill chunks are present: more query tokens share each K/V tile they load.
_PREFILL_BLOCK_M = 64
# Key positions per inner-loop iteration.
_TILE_N = 32


@functools.lru_cache(maxsize=1)
def _kernel():
    """The jitted kernel, built on first use (decorating reads TRITON_INTERPRET, so it is set first)."""
    interpret = _import_triton()
    import triton
    import triton.language as tl

    if interpret and not _interpreted(tl.zeros):
        # triton.language's own helpers were jitted for a GPU when triton was first imported
        raise RuntimeError("Triton was imported before TRITON_INTERPRET=1 was set: without CUDA its kernels only run "
                           "interpreted; set TRITON_INTERPRET=1 in the environment before anything imports triton")

    @triton.jit
    def _paged_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr,
        scale, num_seqs,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr, IEEE: tl.constexpr,
        SLIDING_WINDOW: tl.constexpr,
    ):
        pid = tl.program_id(0)
        kv_head = tl.program_id(1)
        # The sequence of this tile: the last i with query_start[i] // BLOCK_Q + i <= pid (binary search).
        lo = 0
        hi = num_seqs
        while lo < hi - 1:
            mid = (lo + hi) // 2
            if tl.load(query_start_ptr + mid) // BLOCK_Q + mid <= pid:
                lo = mid
            else:
                hi = mid
        seq = lo
        q_start = tl.load(query_start_ptr + seq)
        q_len = tl.load(query_start_ptr + seq + 1) - q_start
        first_q = (pid - (q_start // BLOCK_Q + seq)) * BLOCK_Q
        if first_q >= q_len:
            return
        seq_len = tl.load(seq_lens_ptr + seq)
        context = seq_len - q_len                      # tokens cached before this step's chunk

        rows = tl.arange(0, BLOCK_M)
        q_idx = first_q + rows // GROUP                # query token within the chunk
        head = kv_head * GROUP + rows % GROUP
        row_ok = (rows // GROUP < BLOCK_Q) & (q_idx < q_len)
        q_pos = context + q_idx                         # its position in the sequence
        dims = tl.arange(0, HEAD_DIM_PAD)
        dim_ok = dims < HEAD_DIM
        q = tl.load(q_ptr + (q_start + q_idx)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
        last_pos = tl.minimum(context + first_q + BLOCK_Q, seq_len)   # one past the tile's last query position
        start = 0
        if SLIDING_WINDOW > 0:   # a model's window is fixed: one compiled variant per model
            start = tl.maximum(context + first_q - SLIDING_WINDOW + 1, 0) // TILE_N * TILE_N
        table = block_tables_ptr + seq * stride_bt
        for tile in range(start, last_pos, TILE_N):
            pos = tile + tl.arange(0, TILE_N)
            pos_ok = pos < last_pos
            block = tl.load(table + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
            slot = pos % BLOCK_SIZE
            kv_mask = pos_ok[:, None] & dim_ok[None, :]
            k = tl.load(k_cache_ptr + block[:, None] * stride_kb + slot[:, None] * stride_ks + kv_head * stride_kh
                        + dims[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + block[:, None] * stride_vb + slot[:, None] * stride_vs + kv_head * stride_vh
                        + dims[None, :], mask=kv_mask, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k.to(q.dtype)))
            keep = (pos[None, :] <= q_pos[:, None]) & pos_ok[None, :] & row_ok[:, None]
            if SLIDING_WINDOW > 0:
                keep = keep & (pos[None, :] > q_pos[:, None] - SLIDING_WINDOW)
            s = tl.where(keep, s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # a row with nothing kept yet
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + (q_start + q_idx)[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])

    return triton, _paged_attention_kernel


def _import_triton() -> bool:
    """Import triton; without CUDA first ask for its interpreter (the only way it runs there), which must be set
    before triton is first imported. Returns whether kernels are interpreted."""
    interpret = not torch.cuda.is_available()
    if interpret:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton  # noqa: F401

    return interpret


def _interpreted(fn) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(fn, InterpretedFunction)


def triton_available(device: Optional[torch.device] = None) -> bool:
    """Whether Triton can be imported (it is an optional dependency: the CPU path never needs it) and, for a CUDA
    ``device``, supports it: Triton 3.3 and later support compute capability 8.0 and up (Ampere, Ada, Hopper,
    Blackwell); on a T4 or V100 their dots fall back to scalar code and are not tested upstream, so the GPU path
    keeps torch's attention there. ``TGI_NB_TRITON_ATTENTION=0`` says no everywhere, ``=1`` yes on any GPU.

    Example:
        >>> isinstance(triton_available(), bool)
        True
    """
    switch = os.environ.get("TGI_NB_TRITON_ATTENTION")
    if switch == "0":
        return False
    try:
        _import_triton()
    except ImportError:
        return False
    if device is not None and torch.device(device).type == "cuda" and switch != "1":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return True


def _check(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
           query_start_loc: Tensor, out: Optional[Tensor]) -> None:
    if q.dim() != 3 or q.stride(-1) != 1:
        raise ValueError(f"q must be [num_tokens, num_heads, head_dim] with contiguous rows, got {tuple(q.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"k_cache and v_cache must be [num_blocks, block_size, num_kv_heads, head_dim={q.shape[2]}],"
                         f" got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must have contiguous head_dim rows")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"num_heads ({q.shape[1]}) must be a multiple of num_kv_heads ({k_cache.shape[2]})")
    num_seqs = seq_lens.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or block_tables.stride(-1) != 1:
        raise ValueError(f"block_tables must be [num_seqs={num_seqs}, max_blocks] with contiguous rows, "
                         f"got {tuple(block_tables.shape)}")
    if query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(f"query_start_loc must be [num_seqs + 1 = {num_seqs + 1}], got {tuple(query_start_loc.shape)}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with contiguous rows, got {tuple(out.shape)} "
                         f"{out.dtype}")


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                    query_start_loc: Tensor, scale: float, sliding_window: int = 0, max_query_len: Optional[int] = None,
                    out: Optional[Tensor] = None) -> Tensor:
    """Causal attention of a step's packed query tokens over their sequences' paged K/V, in one launch.

    Args:
        q: ``[num_tokens, num_heads, head_dim]`` (float32, float16 or bfloat16), sequence ``i``'s tokens at
            ``query_start_loc[i]:query_start_loc[i + 1]``.
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]`` of one layer, any float dtype (read
            and widened or narrowed to q's); the step's own K/V already written. Any ``block_size`` and head size.
        block_tables: int32 ``[num_seqs, max_blocks]``; entries past a sequence's blocks are never read.
        seq_lens: int32 ``[num_seqs]``, tokens of each sequence including this step's (0 for a padding row).
        query_start_loc: int32 ``[num_seqs + 1]``, cumulative query token counts, starting at 0.
        scale: multiplies ``q·k``. sliding_window: when > 0, each query sees its last ``sliding_window`` positions.
        max_query_len: the longest chunk, when the caller knows it (1 picks the decode tile); None assumes
            prefill chunks may be present.
        out: optional ``[num_tokens, num_heads, head_dim]`` tensor of q's dtype to write into.

    Grouped-query attention: head ``h`` reads kv head ``h // (num_heads // num_kv_heads)``. float32 inputs use
    IEEE float32 products (not TF32), so a float32 model computes as the reference does.

    Example:
        >>> import torch
        >>> from tgi_nb.models.attention import paged_decode_attention_reference
        >>> g = torch.Generator().manual_seed(0)
        >>> k = torch.randn(6, 16, 2, 32, generator=g); v = torch.randn(6, 16, 2, 32, generator=g)
        >>> q = torch.randn(2, 4, 32, generator=g)          # two decodes, contexts of 20 and 7 tokens
        >>> tables = torch.tensor([[3, 1], [5, 0]], dtype=torch.int32)
        >>> lens = torch.tensor([20, 7], dtype=torch.int32)
        >>> o = paged_attention(q, k, v, tables, lens, torch.tensor([0, 1, 2], dtype=torch.int32), 32 ** -0.5,
        ...                     max_query_len=1)
        >>> ref = paged_decode_attention_reference(q, k, v, tables, lens, 32 ** -0.5)
        >>> torch.allclose(o, ref, atol=1e-5)
        True
    """
    _check(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out)
    if sliding_window < 0:
        raise ValueError(f"sliding_window must be >= 0 (0 = no window), got {sliding_window}")
    if out is None:
        out = torch.empty_like(q)
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    triton, kernel = _kernel()
    kv_heads = k_cache.shape[2]
    group = num_heads // kv_heads
    block_m = _DECODE_BLOCK_M if max_query_len == 1 else _PREFILL_BLOCK_M
    block_m = max(block_m, triton.next_power_of_2(group))
    block_q = block_m // group
    grid = (num_tokens // block_q + num_seqs, kv_heads)
    kernel[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc,
        float(scale), num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=k_cache.shape[1], BLOCK_M=block_m, BLOCK_Q=block_q, TILE_N=_TILE_N,
        IEEE=q.dtype == torch.float32, SLIDING_WINDOW=int(sliding_window),
    )
    return out


@dataclass(slots=True)
class PagedBatch:
    """A step's layout for the GPU forward (what :class:`tgi_nb.engine.step_inputs.StepPacker` builds), the
    counterpart of :class:`tgi_nb.models.attention.AttentionBatch`: every field a device tensor, so the forward
    never reads a value back on the host and a decode step can be captured in a CUDA graph."""

    slot_mapping: Tensor        # int64 [num_tokens]
    seq_lens: Tensor            # int32 [num_seqs]
    query_start_loc: Tensor     # int32 [num_seqs + 1]
    block_tables: Tensor        # int32 [num_seqs, max_blocks]
    max_query_len: Optional[int] = None


def attend_paged(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, batch: PagedBatch, scale: float,
                 sliding_window: int = 0, write_kv: bool = True) -> Tensor:
    """:func:`tgi_nb.models.attention.attend`'s contract over a :class:`PagedBatch`: write the step's K/V
    ([T, kv_heads, d]) to their slots unless ``write_kv`` is False (already written), then attend in one launch.

    Example:
        >>> import torch
        >>> kc, vc = torch.zeros(4, 16, 1, 16), torch.zeros(4, 16, 1, 16)
        >>> q, k, v = torch.randn(3, 2, 16), torch.randn(3, 1, 16), torch.randn(3, 1, 16)
        >>> batch = PagedBatch(torch.tensor([32, 33, 34]), torch.tensor([3], dtype=torch.int32),
        ...                    torch.tensor([0, 3], dtype=torch.int32), torch.tensor([[2]], dtype=torch.int32))
        >>> out = attend_paged(q, k, v, kc, vc, batch, 0.25)
        >>> torch.allclose(out[0], v[0].expand(2, 16), atol=1e-6)     # the first token sees only itself
        True
    """
    if write_kv:
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, batch.slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, batch.slot_mapping, v.to(v_cache.dtype))
    return paged_attention(q, k_cache, v_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, scale,
                           sliding_window, batch.max_query_len)
