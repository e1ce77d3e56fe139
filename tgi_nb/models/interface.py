"""What the engine's model runner needs of a model: :class:`CausalLM`, met by our Llama-family forward
(:class:`~tgi_nb.models.llama.LlamaModel`) and by transformers' modules with our attention plugged in
(:class:`~tgi_nb.models.hf_model.TransformersModel`).

Example:
    >>> from tgi_nb.models.interface import CausalLM
    >>> isinstance(object(), CausalLM)       # a loaded LlamaModel or TransformersModel is one
    False
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from .attention import AttentionBatch


@runtime_checkable
class CausalLM(Protocol):
    """A decoder the runner drives one packed step at a time over a paged KV cache."""

    spec: Any  # LlamaSpec or ModelSpec: vocab_size, num_layers, num_kv_heads, head_dim, ...
    device: torch.device
    dtype: torch.dtype

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], logits_indices: torch.Tensor) -> torch.Tensor:
        """Run the packed tokens, writing their K/V into ``kv_caches``; the logits of ``logits_indices``'s rows."""
        ...
