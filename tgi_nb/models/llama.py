"""Our own forward pass for the Llama family (llama, mistral, qwen2, qwen3), straight from safetensors.

The model works on a *packed* batch: the tokens of every scheduled sequence laid end to end, no
padding. Keys and values go into the paged KV cache owned by the engine; the attention for each
token reads them back through the sequence's block table (see ``tgi_nb.models.attention``).
Projections are fused (q|k|v and gate|up) so one decode step is a handful of large matmuls.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from .attention import AttentionBatch, attend
from .linear import linear
from . import quant
from .quant import QuantizedStack, QuantizedTensor, read_gguf_quantized
from .rope import rope_and_write_kv
from .triton_attention import PagedBatch, attend_paged

logger = logging.getLogger("tgi_nb")

LLAMA_FAMILY = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass(slots=True)
class LlamaSpec:
    """The architecture facts the forward needs, read from a transformers config."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    sliding_window: int  # 0: none

    @classmethod
    def from_config(cls, config) -> "LlamaSpec":
        archs = getattr(config, "architectures", None) or []
        arch = next((LLAMA_FAMILY[a] for a in archs if a in LLAMA_FAMILY), config.model_type)
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        sliding = 0
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", arch == "mistral"):
            sliding = int(config.sliding_window)
        return cls(
            arch=arch,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2",
            qk_norm=config.model_type == "qwen3",
            sliding_window=sliding,
        )


def is_llama_family(config) -> bool:
    """True when our own forward can run this transformers config."""
    archs = getattr(config, "architectures", None) or []
    return any(a in LLAMA_FAMILY for a in archs) or config.model_type in LLAMA_FAMILY.values()


def rope_inv_freq(config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling for the config's RoPE variant (default, linear,
    llama3, yarn, longrope... via transformers' own initialisers, so every scaling it knows works)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope type {rope_type!r} is not supported; known: {sorted(ROPE_INIT_FUNCTIONS)}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


class WeightArena:
    """One anonymous memory mapping that holds all of a model's CPU weights, with transparent huge pages
    requested for it (``madvise(MADV_HUGEPAGE)``: with THP in ``madvise`` mode, as on this project's VM, they are
    only granted on request).

    A decode step streams every weight once; over 2 MiB pages instead of 4 KiB ones the TLB stops missing
    every few rows. Measured on the 2-core EPYC VM: a streaming read at 2 threads went from 20.1 to 22.3 GB/s,
    the SmolLM2 forward at one token 3-7% faster at the median (benchmarks/bench_decode_step.py). Where huge
    pages are not available the mapping works as ordinary memory; past its size ``empty`` falls back to
    ``torch.empty``.

    Example:
        >>> arena = WeightArena(WeightArena.nbytes((4, 8), torch.float32))
        >>> w = arena.empty((4, 8), torch.float32)
        >>> w.shape, w.data_ptr() % 64
        (torch.Size([4, 8]), 0)
    """

    ALIGN = 64                     # bytes: every tensor starts on a cache line
    HUGE_PAGE = 2 << 20

    @classmethod
    def nbytes(cls, shape, dtype: torch.dtype) -> int:
        return -(-math.prod(shape) * dtype.itemsize // cls.ALIGN) * cls.ALIGN

    def __init__(self, num_bytes: int):
        self._used = 0
        self._buffer = None
        if num_bytes <= 0 or not hasattr(mmap, "MAP_ANONYMOUS"):
            return
        # MAP_PRIVATE: a shared anonymous mapping is shmem, whose huge pages follow a different switch.
        self._map = mmap.mmap(-1, num_bytes + self.HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self._map.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # THP compiled out or disabled: ordinary pages
                pass
        whole = torch.frombuffer(self._map, dtype=torch.uint8)   # keeps the mapping alive while tensors use it
        start = -whole.data_ptr() % self.HUGE_PAGE
        self._buffer = whole[start:start + num_bytes]

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous tensor in the arena (or from torch when the arena is full)."""
        size = self.nbytes(shape, dtype)
        if self._buffer is None or self._used + size > self._buffer.numel():
            return torch.empty(shape, dtype=dtype)
        out = self._buffer[self._used:self._used + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        self._used += size
        return out


class LlamaModel:
    """Weights and the packed forward of one Llama-family model.

    Example:
        >>> model = LlamaModel.load("path/to/model_dir", dtype=torch.float32)   # doctest: +SKIP
        >>> logits = model.forward(input_ids, positions, batch, kv_caches, logits_indices)  # doctest: +SKIP
    """

    def __init__(self, config, weights: dict[str, torch.Tensor | QuantizedTensor], dtype: torch.dtype,
                 device: torch.device):
        spec = LlamaSpec.from_config(config)
        self.spec, self.dtype, self.device = spec, dtype, device
        self.config = config
        # GGUF blocks are computed with by the CPU float32 kernels only; anywhere else they are dequantized.
        keep_quantized = device.type == "cpu" and dtype == torch.float32
        # In the kernels' rows16 layout when they are there (the torch fallback converts back on each use).
        pack_rows = keep_quantized and quant.kernel_variant() is not None

        def arena_bytes(w) -> int:
            if isinstance(w, QuantizedTensor):
                if not keep_quantized:
                    return WeightArena.nbytes(w.shape, dtype)
                return WeightArena.nbytes((QuantizedTensor.layout_nbytes(w.qtype, w.shape, "rows16" if pack_rows
                                                                         else w.layout),), torch.uint8)
            return WeightArena.nbytes(w.shape, dtype)

        # On CPU every weight lives in one huge-page arena; elsewhere each is its own tensor on the device.
        arena = WeightArena(sum(arena_bytes(w) for w in weights.values())) if device.type == "cpu" else None

        def take(*names: str) -> torch.Tensor | QuantizedTensor | QuantizedStack:
            """The named weights, concatenated along dim 0, as one new contiguous tensor (a copy, never a
            view of the safetensors file mapping: that measured 2x slower to stream through in decode).
            Quantized parts stay quantized: of one type, their block rows concatenated; of several types (a
            Q4_K_M file's q|k|v with v in Q6_K), or rows off the 16-row groups, a QuantizedStack of the parts
            (which the kernels take in one call; without kernels such parts are dequantized)."""
            parts = [weights.pop(name) for name in names]
            qtypes = {p.qtype if isinstance(p, QuantizedTensor) else None for p in parts}
            if keep_quantized and None not in qtypes and (pack_rows or len(qtypes) == 1):
                qtype, shape = parts[0].qtype, (sum(p.shape[0] for p in parts), parts[0].shape[1])
                if not pack_rows:
                    out = arena.empty((shape[0], parts[0].data.shape[1]), torch.uint8)
                    torch.cat([p.data for p in parts], out=out)
                    return QuantizedTensor(out, qtype, shape)
                if len(qtypes) == 1 and all(p.shape[0] % quant.GROUP == 0 for p in parts):
                    # Regrouped for the kernels (vector lanes = rows); each part on whole groups, so that the
                    # up half of gate|up starts on one.
                    whole = QuantizedTensor(torch.cat([p.to_layout("ggml").data for p in parts]), qtype, shape)
                    return whole.to_layout("rows16", out=arena.empty((whole.layout_nbytes(qtype, shape, "rows16"),),
                                                                     torch.uint8))
                packed = tuple(p.to_layout("rows16", out=arena.empty(
                    (p.layout_nbytes(p.qtype, p.shape, "rows16"),), torch.uint8)) for p in parts)
                return packed[0] if len(packed) == 1 else QuantizedStack(packed)
            parts = [p.dequantize() if isinstance(p, QuantizedTensor) else p for p in parts]
            shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
            out = arena.empty(shape, dtype) if arena else torch.empty(shape, dtype=dtype, device=device)
            row = 0
            for part in parts:
                out[row:row + part.shape[0]].copy_(part)
                row += part.shape[0]
            return out

        def maybe(*names: str) -> Optional[torch.Tensor]:
            return take(*names) if all(name in weights for name in names) else None

        self.embed = take("model.embed_tokens.weight")
        self.layers = []
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            self.layers.append(dict(
                input_norm=take(p + "input_layernorm.weight"),
                qkv=take(*(p + f"self_attn.{n}_proj.weight" for n in "qkv")),
                qkv_bias=maybe(*(p + f"self_attn.{n}_proj.bias" for n in "qkv")),
                q_norm=maybe(p + "self_attn.q_norm.weight"),
                k_norm=maybe(p + "self_attn.k_norm.weight"),
                o=take(p + "self_attn.o_proj.weight"),
                post_norm=take(p + "post_attention_layernorm.weight"),
                gate_up=take(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                down=take(p + "mlp.down_proj.weight"),
            ))
        self.norm = take("model.norm.weight")
        untied = "lm_head.weight" in weights and not spec.tie_word_embeddings
        self.lm_head = take("lm_head.weight") if untied else self.embed
        inv_freq, scaling = rope_inv_freq(config)
        self._inv_freq, self._rope_scaling = inv_freq, scaling
        self._cos = self._sin = torch.empty(0)
        self._ensure_rope(spec.max_position_embeddings)
        self._fused = False          # the fused decode step: built on first use (None when it does not apply)
        self.numerics = "exact"
        self._aranges = torch.arange(64)

    @classmethod
    def load(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu", config=None,
             gguf_file: Optional[str | Path] = None, quantize: Optional[str] = None,
             numerics: str = "exact") -> "LlamaModel":
        """Load config and safetensors shards from a local Hugging Face layout directory.

        On CPU in float32 (elsewhere both are ignored):
        - ``gguf_file``: the GGUF file the folder was converted from; its tensors of the types kept as stored
          (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) are used as stored instead of their dequantized
          copies in the folder;
        - ``quantize``: one of those types quantizes the float linear weights at load (the embedding into
          q8_0; a weight whose columns are not whole blocks stays float), as TGI's ``--quantize``;
        - ``numerics``: how products with those blocks compute: ``"exact"`` (float32 activations) or ``"fast"``
          (int8 activations, llama.cpp's numerics; see ``tgi_nb.engine.config.NUMERICS_CHOICES``).
        """
        from transformers import AutoConfig

        model_dir = Path(model_dir)
        device = torch.device(device)
        config = config or AutoConfig.from_pretrained(model_dir)
        index = model_dir / "model.safetensors.index.json"
        files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
                 else sorted(p.name for p in model_dir.glob("*.safetensors")))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
        quantized = {}
        if gguf_file is not None and device.type == "cpu" and dtype == torch.float32:
            spec = LlamaSpec.from_config(config)
            quantized = read_gguf_quantized(gguf_file, spec.num_heads, spec.num_kv_heads)
        weights: dict[str, torch.Tensor | QuantizedTensor] = {}
        for name in files:
            with safe_open(model_dir / name, framework="pt") as f:
                for key in f.keys():
                    q = quantized.get(key)
                    if q is not None and _same_weight(q, f.get_slice(key)):
                        weights[key] = q
                    else:
                        weights[key] = f.get_tensor(key)
        if quantize is not None and device.type == "cpu" and dtype == torch.float32:
            weights = {name: _quantize_at_load(name, w, quantize) for name, w in weights.items()}
        model = cls(config, weights, dtype, device)
        model.set_numerics(numerics)
        return model

    def set_numerics(self, numerics: str) -> None:
        """``"exact"`` or ``"fast"``: how products with quantized weights compute from now on."""
        if numerics not in quant.NUMERICS:
            raise ValueError(f"numerics: must be one of {', '.join(quant.NUMERICS)}, got {numerics!r}")
        self.numerics = numerics

    def weight_formats(self) -> str:
        """How the weights are held, e.g. ``"q4_1 (210 tensors), q8_0 (1), float32 (62)"``, for logs (the parts of
        a fused weight of several types counted apart)."""
        counts: dict[str, int] = {}
        tensors = [self.embed, self.norm, *(w for layer in self.layers for w in layer.values() if w is not None)]
        if self.lm_head is not self.embed:
            tensors.append(self.lm_head)
        for w in tensors:
            for part in w.parts if isinstance(w, (QuantizedTensor, QuantizedStack)) else (w,):
                kind = part.qtype if isinstance(part, QuantizedTensor) else str(part.dtype).split(".")[-1]
                counts[kind] = counts.get(kind, 0) + 1
        return ", ".join(f"{k} ({v})" for k, v in counts.items())

    def _ensure_rope(self, length: int) -> None:
        # cos/sin computed in float32 then cast, exactly as transformers' rotary embedding does.
        if self._cos.shape[0] >= length:
            return
        positions = torch.arange(length, dtype=torch.float32)
        freqs = positions[:, None] * self._inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self._cos = (emb.cos() * self._rope_scaling).to(device=self.device, dtype=self.dtype)
        self._sin = (emb.sin() * self._rope_scaling).to(device=self.device, dtype=self.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                logits_indices: torch.Tensor) -> torch.Tensor:
        """Run the packed tokens through the model, writing their K/V into ``kv_caches``; return
        float32 logits for the rows in ``logits_indices`` only (the last token of each sequence that
        samples this step).

        Decode tokens (the batch's first ``num_decodes``, each its own logits row) take the fused native step
        when it applies (:mod:`tgi_nb.models.decode_step`), always, whatever else shares the step, so that a
        sequence's tokens never depend on its neighbours; prefill chunks take the per-layer path.

        A :class:`~tgi_nb.models.triton_attention.PagedBatch` (the GPU path) runs the per-layer path with Triton
        attention, reading nothing back on the host (the rotary table covers ``max_position_embeddings``)."""
        if isinstance(batch, PagedBatch):
            return self._layered_forward(input_ids, positions, batch, kv_caches, logits_indices)
        self._ensure_rope(int(positions.max()) + 1)
        nd = batch.num_decodes
        fused = self._fused_decode() if nd else None
        if fused is not None and fused.usable(kv_caches) and torch.equal(logits_indices[:nd], self._arange(nd)):
            logits = fused.run(input_ids[:nd], positions[:nd], batch.slot_mapping[:nd], batch.decode_block_tables,
                               batch.decode_context_lens, kv_caches)
            if nd == input_ids.shape[0]:
                return logits[:logits_indices.shape[0]]
            rest = AttentionBatch(slot_mapping=batch.slot_mapping[nd:], num_decodes=0, decode_block_tables=None,
                                  decode_context_lens=None,
                                  prefills=[(start - nd, n, cached, table) for start, n, cached, table in batch.prefills])
            prefill_logits = self._layered_forward(input_ids[nd:], positions[nd:], rest, kv_caches,
                                                   logits_indices[nd:] - nd)
            return torch.cat([logits, prefill_logits])
        return self._layered_forward(input_ids, positions, batch, kv_caches, logits_indices)

    def _fused_decode(self):
        if self._fused is False:
            from .decode_step import FusedDecode

            self._fused = FusedDecode.for_model(self)
        return self._fused

    def _arange(self, n: int) -> torch.Tensor:
        if self._aranges.shape[0] < n:
            self._aranges = torch.arange(max(n, 2 * self._aranges.shape[0]))
        return self._aranges[:n]

    def _layered_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                         kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                         logits_indices: torch.Tensor) -> torch.Tensor:
        s = self.spec
        num_tokens = input_ids.shape[0]
        eps = s.rms_norm_eps
        numerics = self.numerics
        if logits_indices.numel() == 0:      # a prefill chunk that samples nothing: skip the lm_head
            logits_out = torch.empty(0, s.vocab_size, dtype=torch.float32, device=input_ids.device)
        else:
            logits_out = None

        # Per layer: RMSNorm fused into the q|k|v product, RoPE + KV-cache write in one call, attention, the
        # o product adding the residual, RMSNorm fused into gate|up with silu(gate) * up as its epilogue, the
        # down product adding the residual. On CPU float32 each of these is one native call.
        x = self.embed.dequantize(input_ids) if isinstance(self.embed, QuantizedTensor) else self.embed[input_ids]
        attend_fn = attend_paged if isinstance(batch, PagedBatch) else attend
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            qkv = linear(x, layer["qkv"], layer["qkv_bias"], norm=(layer["input_norm"], eps), numerics=numerics)
            q, k, v = rope_and_write_kv(qkv, positions, self._cos, self._sin, k_cache, v_cache, batch.slot_mapping,
                                        s.num_heads, layer["q_norm"], layer["k_norm"], eps)
            attn = attend_fn(q, k, v, k_cache, v_cache, batch, s.head_dim ** -0.5, s.sliding_window, write_kv=False)
            x = linear(attn.view(num_tokens, -1), layer["o"], residual=x, numerics=numerics)
            mlp = linear(x, layer["gate_up"], norm=(layer["post_norm"], eps), silu_mul=True, numerics=numerics)
            x = linear(mlp, layer["down"], residual=x, numerics=numerics)
        if logits_out is not None:
            return logits_out
        return linear(x[logits_indices], self.lm_head, norm=(self.norm, eps), numerics=numerics).float()


_QUANTIZABLE = ("_proj.weight", "embed_tokens.weight", "lm_head.weight")


def _quantize_at_load(name: str, weight, qtype: str):
    qtype = qtype if "_proj." in name else "q8_0"
    if isinstance(weight, QuantizedTensor) or not name.endswith(_QUANTIZABLE) or weight.dim() != 2 \
            or weight.shape[1] % quant.BLOCK_WEIGHTS[qtype]:
        return weight
    return QuantizedTensor.quantize(weight, qtype)


def _same_weight(quantized: QuantizedTensor, stored) -> bool:
    """Whether GGUF blocks hold the folder's (dequantized) tensor: same shape and, on a few rows spread over
    it (q/k rows are permuted in llama GGUFs), the same values bit for bit. A mismatch (a folder that is not
    this file's conversion) keeps the folder's float weights, with a warning."""
    rows, cols = quantized.shape
    if tuple(stored.get_shape()) != (rows, cols):
        logger.warning("GGUF tensor %s %s does not match the folder's %s; using the folder's", quantized.qtype,
                       quantized.shape, tuple(stored.get_shape()))
        return False
    probe = sorted({0, 1, rows // 3, rows - 1})
    expected = torch.cat([stored[r:r + 1] for r in probe]).float()
    if not torch.equal(quantized.dequantize(torch.tensor(probe)), expected):
        logger.warning("GGUF blocks (%s %s) differ from the folder's weights; using the folder's", quantized.qtype,
                       quantized.shape)
        return False
    return True
