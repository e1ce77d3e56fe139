"""A Llama-family decode step in one native call (``csrc/decode_step.c``): every layer, the final norm and the
lm_head for up to 64 sequences of one token each, the threads inside one parallel region from the first layer to
the logits.

The per-layer path (:meth:`tgi_nb.models.llama.LlamaModel.forward`) makes six calls per layer from Python, each
a ctypes call that starts its own parallel section; at one token that overhead was about a third of SmolLM2-135M's
step (6.4 ms, of which 4.2 ms in the products, ``benchmarks/bench_decode_step.py``). The fused step runs the same
kernels (the file includes ``quant_gemm.c``, ``rope_cache.c`` and ``paged_attention.c``) with barriers between them.

It applies when the model's products are all GGUF blocks in the rows16 layout, of any kept type and mixed within a
fused weight (the bundled model, a Q4_K_M file, or ``--quantize``), the KV cache is float32 or float16 and a
quantized kernel variant is available; otherwise the per-layer path runs. It computes with the model's numerics (``LlamaModel.numerics``: exact float32 activations, or fast int8 ones). ``TGI_NB_FUSED_DECODE=0`` turns it off (to compare, or to rule it out).
"""

from __future__ import annotations

import ctypes
import os
from typing import TYPE_CHECKING, Optional

import torch

from . import native, quant
from .quant import QuantizedStack, QuantizedTensor

if TYPE_CHECKING:    # pragma: no cover
    from .llama import LlamaModel

SWITCH = "TGI_NB_FUSED_DECODE"
MAX_ROWS = 64          # sequences per call (the kernel's fused silu scratch); more are run in chunks

_ARGS = ([ctypes.c_void_p] * 5 + [ctypes.c_int32, ctypes.c_void_p, ctypes.c_int]
         + [ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_void_p] * 2 + [ctypes.c_int] * 2)
# Per variant and KV cache dtype (the float16 build reads and writes a half-size cache).
_KERNELS = {(variant, dtype): native.NativeFunction("decode_step", symbol, _ARGS, quant.build_flags(variant) + extra)
            for variant in quant.VARIANTS
            for dtype, symbol, extra in ((torch.float32, "tgi_nb_decode_step", []),
                                         (torch.float16, "tgi_nb_decode_step_f16kv", ["-DKV_HALF"]))}

# Indices into the kernel's arrays (the enums at the top of csrc/decode_step.c).
_DIMS = ("layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab", "window", "max_pos",
         "num_blocks", "block_size")
_LAYER_PTRS = ("qkv", "o", "gate_up", "down", "qkv_bias", "input_norm", "post_norm", "q_norm", "k_norm")
_K_CACHE, _V_CACHE = len(_LAYER_PTRS), len(_LAYER_PTRS) + 1
_PRODUCTS = ("qkv", "o", "gate_up", "down")


def _rows16(w) -> bool:
    return isinstance(w, (QuantizedTensor, QuantizedStack)) and w.layout == "rows16"


def _float32(t: Optional[torch.Tensor]) -> bool:
    return t is None or (t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu")


class FusedDecode:
    """The fused step of one :class:`~tgi_nb.models.llama.LlamaModel`; :meth:`for_model` gives None for a model it
    cannot run.

    Example:
        >>> step = FusedDecode.for_model(model)                                      # doctest: +SKIP
        >>> logits = step.run(ids, positions, slots, tables, context_lens, kv_caches)   # doctest: +SKIP
    """

    @classmethod
    def for_model(cls, model: "LlamaModel") -> Optional["FusedDecode"]:
        s = model.spec
        if model.device.type != "cpu" or model.dtype != torch.float32 or not _rows16(model.lm_head):
            return None
        if s.hidden_size % quant.BLOCK or (s.num_heads * s.head_dim) % quant.BLOCK:
            return None
        for layer in model.layers:
            if not all(_rows16(layer[name]) for name in _PRODUCTS) or not quant.gated_on_groups(layer["gate_up"]):
                return None
            if not all(_float32(layer[name]) for name in ("qkv_bias", "input_norm", "post_norm", "q_norm", "k_norm")):
                return None
        if not _float32(model.norm):
            return None
        return cls(model)

    def __init__(self, model: "LlamaModel"):
        s = model.spec
        self.model = model
        self.dims = torch.tensor([s.num_layers, s.hidden_size, s.intermediate_size, s.num_heads, s.num_kv_heads,
                                  s.head_dim, s.vocab_size, s.sliding_window, 0, 0, 0], dtype=torch.int64)
        self.fparams = torch.tensor([s.rms_norm_eps, s.head_dim ** -0.5], dtype=torch.float32)
        self.layer_ptrs = torch.zeros(s.num_layers, len(_LAYER_PTRS) + 2, dtype=torch.int64)
        self.layer_types = torch.zeros(s.num_layers, len(_PRODUCTS), dtype=torch.int32)
        # The products as the kernels' segment tables (kept alive by the weights that cache them), and their lengths.
        for i, layer in enumerate(model.layers):
            for j, name in enumerate(_LAYER_PTRS):
                w = layer[name]
                self.layer_ptrs[i, j] = 0 if w is None else (w.segments() if name in _PRODUCTS else w).data_ptr()
            for j, name in enumerate(_PRODUCTS):
                self.layer_types[i, j] = layer[name].segments().shape[0]
        self.model_ptrs = torch.zeros(4, dtype=torch.int64)
        self.model_ptrs[2] = model.norm.data_ptr()
        self.model_ptrs[3] = model.lm_head.segments().data_ptr()
        self.lm_head_type = model.lm_head.segments().shape[0]

    def usable(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """Whether this step can run now: the switch is on, a kernel is built, the cache is float32 or float16 on the
        CPU."""
        if os.environ.get(SWITCH, "1").strip().lower() in native._DISABLE_VALUES:
            return False
        k = kv_caches[0][0]
        if (k.dtype not in (torch.float32, torch.float16) or k.device.type != "cpu" or not k.is_contiguous()
                or len(kv_caches) != self.model.spec.num_layers):
            return False
        variant = quant.kernel_variant()
        return variant is not None and _KERNELS[variant, k.dtype].get() is not None

    def _bind_caches(self, kv_caches) -> None:
        # Every call, every layer (~10 us): a cache list built anew can reuse a freed list's id and its first
        # tensor's address while the other layers' tensors moved, so no cheap key proves the pointers current.
        self.layer_ptrs[:, _K_CACHE] = torch.tensor([k.data_ptr() for k, _ in kv_caches], dtype=torch.int64)
        self.layer_ptrs[:, _V_CACHE] = torch.tensor([v.data_ptr() for _, v in kv_caches], dtype=torch.int64)
        self.dims[_DIMS.index("num_blocks")] = kv_caches[0][0].shape[0]
        self.dims[_DIMS.index("block_size")] = kv_caches[0][0].shape[1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, block_tables: torch.Tensor,
            context_lens: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """float32 logits ``[rows, vocab]`` of one decode token per sequence, writing their K/V into the cache.
        ``block_tables`` int32 ``[rows, max_blocks]``, ``context_lens`` int32 ``[rows]`` (tokens including this
        one); the model's RoPE table must cover the positions (``LlamaModel._ensure_rope``)."""
        model = self.model
        self._bind_caches(kv_caches)
        self.dims[_DIMS.index("max_pos")] = model._cos.shape[0]
        self.model_ptrs[0], self.model_ptrs[1] = model._cos.data_ptr(), model._sin.data_ptr()
        kernel = _KERNELS[quant.kernel_variant(), kv_caches[0][0].dtype].get()
        rows = input_ids.shape[0]
        positions = positions.to(torch.int64).contiguous()
        slots = slots.to(torch.int64).contiguous()
        block_tables = block_tables.to(torch.int32).contiguous()
        context_lens = context_lens.to(torch.int32).contiguous()
        embed = model.embed
        x = embed.dequantize(input_ids) if isinstance(embed, QuantizedTensor) else embed[input_ids].float()
        x = x.contiguous()
        logits = torch.empty(rows, model.spec.vocab_size, dtype=torch.float32)
        for start in range(0, rows, MAX_ROWS):
            end = min(rows, start + MAX_ROWS)
            rc = kernel(self.dims.data_ptr(), self.fparams.data_ptr(), self.layer_ptrs.data_ptr(),
                        self.layer_types.data_ptr(), self.model_ptrs.data_ptr(), self.lm_head_type,
                        x[start:].data_ptr(), end - start, positions[start:].data_ptr(), slots[start:].data_ptr(),
                        block_tables[start:].data_ptr(), block_tables.shape[1], context_lens[start:].data_ptr(),
                        logits[start:].data_ptr(), torch.get_num_threads(), int(model.numerics == "fast"))
            if rc == 1:
                raise ValueError("decode step: a position, cache slot, context length, block table entry or weight "
                                 "table is out of range")
            if rc:
                raise MemoryError("decode step: could not allocate its scratch memory")
        return logits
