"""Any causal LM transformers can build, run with our paged KV cache and attention plugged in.

Architectures outside the Llama family (Gemma, Phi-3, OLMo, ...) keep transformers' own modules for
everything but attention: we register an attention function with transformers' ``AttentionInterface``
that writes the layer's keys and values into our paged cache and attends through our kernels. The
packed batch goes in as one row with explicit ``position_ids``, so continuous batching, chunked
prefill, prefix caching and preemption work exactly as for our own forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .attention import AttentionBatch, attend

ATTENTION_NAME = "tgi_nb_paged"


@dataclass(slots=True)
class ModelSpec:
    """What the engine needs to size the KV cache and check requests."""

    arch: str
    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    sliding_window: int


class _StepContext:
    """The current step's batch and caches, read by the attention function of every layer."""

    batch: Optional[AttentionBatch] = None
    kv_caches: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None


def _paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             softcap=None, **kwargs):
    context: _StepContext = module._tgi_nb_context
    if softcap:
        raise NotImplementedError("attention logit soft-capping is not supported by tgi_nb's paged attention")
    k_cache, v_cache = context.kv_caches[module.layer_idx]
    q = query[0].transpose(0, 1).contiguous()
    k = key[0].transpose(0, 1).contiguous()
    v = value[0].transpose(0, 1).contiguous()
    window = getattr(module, "sliding_window", None) or 0
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    return attend(q, k, v, k_cache, v_cache, context.batch, scale, int(window)).unsqueeze(0), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _paged_attention_forward)


class TransformersModel:
    """transformers' model for the architecture, with tgi_nb's paged attention.

    Example:
        >>> model = TransformersModel.load("path/to/gemma", dtype=torch.float32)       # doctest: +SKIP
        >>> logits = model.forward(input_ids, positions, batch, kv_caches, logits_indices)  # doctest: +SKIP
    """

    def __init__(self, hf_model, dtype: torch.dtype, device: torch.device):
        self.hf = hf_model
        self.dtype, self.device = dtype, device
        text = hf_model.config.get_text_config()
        softcap = getattr(text, "attn_logit_softcapping", None)
        if softcap:   # Gemma 2: refused at load rather than at the first request
            raise ValueError(f"{text.model_type}: attention logit soft-capping (attn_logit_softcapping={softcap}) is "
                             f"not supported by tgi_nb's paged attention; serve this model with TGI, vLLM or "
                             f"llama.cpp and connect() to it")
        num_heads = text.num_attention_heads
        self.spec = ModelSpec(
            arch=text.model_type,
            vocab_size=text.vocab_size,
            num_layers=text.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // num_heads,
            max_position_embeddings=text.max_position_embeddings,
            sliding_window=int(getattr(text, "sliding_window", None) or 0),
        )
        self._context = _StepContext()
        for module in hf_model.modules():
            if hasattr(module, "layer_idx"):
                module._tgi_nb_context = self._context

    @classmethod
    def load(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
             trust_remote_code: bool = False) -> "TransformersModel":
        from transformers import AutoModelForCausalLM

        _register()
        hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=ATTENTION_NAME,
                                                        trust_remote_code=trust_remote_code)
        return cls(hf_model.to(device).eval(), dtype, torch.device(device))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], logits_indices: torch.Tensor) -> torch.Tensor:
        """Same contract as ``LlamaModel.forward``: float32 logits of the ``logits_indices`` rows."""
        self._context.batch, self._context.kv_caches = batch, kv_caches
        try:
            out = self.hf(input_ids=input_ids[None], position_ids=positions[None], use_cache=False,
                          logits_to_keep=logits_indices)
        finally:
            self._context.batch = self._context.kv_caches = None
        return out.logits[0].float()
