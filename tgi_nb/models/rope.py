"""Rotary position embedding of a step's queries and keys, and the write of its keys and values into the
paged KV cache.

:func:`rope_and_write_kv` takes the fused q|k|v projection of the packed tokens. float32 CPU tensors, with a
float32 or float16 KV cache, run ``csrc/rope_cache.c``, in place, in one call per layer; anything else (CUDA,
bfloat16, float64, no compiler, ``TGI_NB_NATIVE_ROPE=0``) runs the same steps as torch ops. The two agree to
float32 rounding, and to the bit on what a float16 cache stores (tests/test_kernels.py).
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native

_KERNEL = native.NativeFunction(
    "rope_cache", "tgi_nb_rope_write_kv_f32",
    [ctypes.c_void_p] * 9 + [ctypes.c_float] + [ctypes.c_int64] * 7,
    # products rounded before they are added, as torch's separate multiply and add ops do
    extra_flags=["-ffp-contract=off"], switch="TGI_NB_NATIVE_ROPE")
# The KV cache dtypes the kernel writes, and its last argument for each.
_KV_HALF = {torch.float32: 0, torch.float16: 1}


def native_rope_available() -> bool:
    """Whether float32 CPU steps with a float32 cache run the native kernel (building it on first call)."""
    return _KERNEL.available()


def rope_and_write_kv(qkv: Tensor, positions: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                      slot_mapping: Tensor, num_heads: int, q_norm: Optional[Tensor] = None,
                      k_norm: Optional[Tensor] = None, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """Rotate queries and keys by their positions and write keys and values to their cache slots.

    Args:
        qkv: ``[T, (num_heads + 2 * num_kv_heads) * head_dim]``, the fused projection of T packed tokens.
        positions: int64 ``[T]``, each token's position in its sequence.
        cos, sin: ``[max_positions, head_dim]`` tables (``cat(freqs, freqs)``, transformers' layout).
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]`` of this layer, of qkv's dtype or
            float16 (k and v are rounded to it as they are stored; q and the returned k, v stay in qkv's dtype).
        slot_mapping: int64 ``[T]``, ``block * block_size + offset`` of each token's K/V.
        q_norm, k_norm: per-head RMSNorm weights applied before the rotation (Qwen3), or None.

    Returns ``(q [T, num_heads, head_dim], k [T, num_kv_heads, head_dim], v [T, num_kv_heads, head_dim])``, the
    rotated q and k. On the native path these are views of ``qkv``, which is modified in place.

    Example:
        >>> T, H, KVH, D = 3, 4, 2, 8
        >>> qkv = torch.randn(T, (H + 2 * KVH) * D)
        >>> k_cache, v_cache = torch.zeros(2, 4, KVH, D), torch.zeros(2, 4, KVH, D)
        >>> angles = torch.arange(16.0)[:, None] * torch.rand(D // 2)[None, :]
        >>> cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
        >>> q, k, v = rope_and_write_kv(qkv, torch.tensor([5, 6, 7]), cos, sin, k_cache, v_cache,
        ...                             torch.tensor([1, 2, 4]), num_heads=H)
        >>> torch.equal(k_cache.view(-1, KVH, D)[4], k[2]), torch.equal(v_cache.view(-1, KVH, D)[2], v[1])
        (True, True)
    """
    num_tokens = qkv.shape[0]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    if qkv.shape[1] != q_size + 2 * kv_size:
        raise ValueError(f"qkv has {qkv.shape[1]} columns, expected (num_heads + 2 * num_kv_heads) * head_dim "
                         f"= {q_size + 2 * kv_size}")
    if (qkv.dtype == torch.float32 and k_cache.dtype in _KV_HALF and v_cache.dtype == k_cache.dtype
            and cos.dtype == torch.float32 and qkv.device.type == "cpu" and qkv.is_contiguous()
            and k_cache.is_contiguous() and v_cache.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()
            and cos.shape[-1] == head_dim and native_rope_available()):
        positions = positions if positions.dtype == torch.int64 else positions.long()
        slot_mapping = slot_mapping if slot_mapping.dtype == torch.int64 else slot_mapping.long()
        rc = _KERNEL.get()(
            qkv.data_ptr(), positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), slot_mapping.data_ptr(),
            k_cache.data_ptr(), v_cache.data_ptr(), q_norm.data_ptr() if q_norm is not None else None,
            k_norm.data_ptr() if k_norm is not None else None, eps, num_tokens, num_heads, num_kv_heads,
            head_dim, k_cache.shape[0] * k_cache.shape[1], cos.shape[0], _KV_HALF[k_cache.dtype])
        if rc:
            raise ValueError(f"a position is outside the rotary table ({cos.shape[0]}) or a slot outside the "
                             f"KV cache ({k_cache.shape[0] * k_cache.shape[1]})")
        return (qkv[:, :q_size].view(num_tokens, num_heads, head_dim),
                qkv[:, q_size:q_size + kv_size].view(num_tokens, num_kv_heads, head_dim),
                qkv[:, q_size + kv_size:].view(num_tokens, num_kv_heads, head_dim))
    return _torch_rope_and_write_kv(qkv, positions, cos, sin, k_cache, v_cache, slot_mapping, num_heads,
                                    q_norm, k_norm, eps)


def _torch_rope_and_write_kv(qkv, positions, cos, sin, k_cache, v_cache, slot_mapping, num_heads, q_norm, k_norm,
                             eps):
    num_tokens = qkv.shape[0]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    # q and k are rotated together: one [T, heads + kv_heads, d] view of the fused projection.
    qk = qkv[:, :q_size + kv_size].view(num_tokens, num_heads + num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size:].view(num_tokens, num_kv_heads, head_dim)
    if q_norm is not None:
        qk = torch.cat([F.rms_norm(qk[:, :num_heads], (head_dim,), q_norm, eps),
                        F.rms_norm(qk[:, num_heads:], (head_dim,), k_norm, eps)], dim=1)
    half = head_dim // 2
    rotated = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)
    qk = qk * cos[positions].unsqueeze(1) + rotated * sin[positions].unsqueeze(1)
    q, k = qk[:, :num_heads], qk[:, num_heads:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
    return q, k, v
