"""Owns the model and its paged KV cache; turns a scheduled step into one forward pass."""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from typing import Optional

import torch

from tgi_nb.models.attention import AttentionBatch
from tgi_nb.models.interface import CausalLM

from .scheduler import SchedulerOutput
from .sequence import Sequence


@dataclass
class PromptRows:
    """Logits of one prefill chunk's rows that score prompt tokens: ``logits[i]`` (after ``run``) is the
    distribution of prompt token ``positions[i] + 1``; ``start`` is the first of those rows in the packed batch."""

    seq: Sequence
    positions: range
    start: int
    logits: Optional[torch.Tensor] = None


def allocate_kv_caches(num_layers: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A zeroed (K, V) cache per layer. On the CPU all of them are views of one anonymous memory mapping: the
    kernel hands out zero pages on first touch, so blocks never used never become resident (an up-front
    ``torch.zeros`` of the whole cache would write, and keep, every page). Freed blocks are handed out again
    before untouched ones (see ``BlockManager``), so what is resident follows the peak of the work.

    Zeroed, not uninitialised: padded block-table entries of the torch attention path read them (masked),
    and masked garbage could be NaN.

    Example:
        >>> caches = allocate_kv_caches(2, (4, 16, 1, 8), torch.float32, torch.device("cpu"))
        >>> len(caches), caches[1][0].shape, float(caches[1][1].abs().sum())
        (2, torch.Size([4, 16, 1, 8]), 0.0)
    """
    if device.type != "cpu" or not hasattr(mmap, "MAP_ANONYMOUS"):
        return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                for _ in range(num_layers)]
    # Each tensor starts on its own page, so that touching one layer's blocks never makes another's resident.
    per_tensor = -(-math.prod(shape) * dtype.itemsize // mmap.PAGESIZE) * mmap.PAGESIZE
    mapping = mmap.mmap(-1, per_tensor * 2 * num_layers, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)   # the tensors keep the mapping alive
    count = math.prod(shape) * dtype.itemsize

    def view(i: int) -> torch.Tensor:
        return whole[i * per_tensor:i * per_tensor + count].view(dtype).view(shape)

    return [(view(2 * layer), view(2 * layer + 1)) for layer in range(num_layers)]


class ModelRunner:
    """Allocates ``num_blocks`` KV blocks per layer (of ``kv_dtype``, default the model's) and runs packed steps.

    Example:
        >>> runner = ModelRunner(model, num_blocks=256, block_size=16)    # doctest: +SKIP
        >>> logits, seqs = runner.run(scheduler.schedule())               # doctest: +SKIP
    """

    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, kv_dtype: Optional[torch.dtype] = None):
        self.model = model
        self.block_size = block_size
        spec = model.spec
        shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        self.kv_caches = allocate_kv_caches(spec.num_layers, shape, kv_dtype or model.dtype, model.device)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.model.device)
        dst = torch.tensor([d for _, d in copies], device=self.model.device)
        for k, v in self.kv_caches:
            k[dst] = k[src]
            v[dst] = v[src]

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def run(self, step: SchedulerOutput) -> tuple[torch.Tensor, list[Sequence], list[PromptRows]]:
        """Compute the step's tokens; return logits (float32, one row per sequence that samples now:
        decodes and prefills whose chunk reaches the end of their tokens), those sequences, and for
        prefill chunks of requests that asked for prompt log-probabilities, the logits that score the
        chunk's next prompt tokens."""
        device = self.model.device
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        sampling: list[Sequence] = []

        for seq in step.decodes:
            pos = seq.num_computed_tokens
            logits_indices.append(len(input_ids))
            sampling.append(seq)
            input_ids.append(seq.token_ids[pos])
            positions.append(pos)
            slots.extend(self._slots(seq, pos, pos + 1))
        decode_tables = decode_lens = None
        if step.decodes:
            width = max(len(s.block_table) for s in step.decodes)
            decode_tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table))
                                          for s in step.decodes], dtype=torch.int32, device=device)
            decode_lens = torch.tensor([s.num_computed_tokens + 1 for s in step.decodes],
                                       dtype=torch.int32, device=device)

        prefills = []
        prompt_rows: list[PromptRows] = []
        for seq, n in step.prefills:
            start, cached = len(input_ids), seq.num_computed_tokens
            input_ids.extend(seq.token_ids[cached:cached + n])
            positions.extend(range(cached, cached + n))
            slots.extend(self._slots(seq, cached, cached + n))
            table = torch.tensor(seq.block_table, dtype=torch.long, device=device) if cached else None
            prefills.append((start, n, cached, table))
            if seq.request.prompt_logprobs is not None and seq.num_output_tokens == 0:
                # row of position p scores prompt token p + 1
                last = min(cached + n, len(seq.request.prompt_token_ids) - 1)
                prompt_rows.append(PromptRows(seq, range(cached, last), start))
            if cached + n == len(seq.token_ids):
                logits_indices.append(start + n - 1)
                sampling.append(seq)

        batch = AttentionBatch(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            num_decodes=len(step.decodes),
            decode_block_tables=decode_tables,
            decode_context_lens=decode_lens,
            prefills=prefills,
        )
        num_sampling = len(logits_indices)
        for rows in prompt_rows:   # after the sampling rows
            logits_indices.extend(range(rows.start, rows.start + len(rows.positions)))
        logits = self.model.forward(
            torch.tensor(input_ids, dtype=torch.long, device=device),
            torch.tensor(positions, dtype=torch.long, device=device),
            batch, self.kv_caches,
            torch.tensor(logits_indices, dtype=torch.long, device=device),
        ).cpu()
        first = num_sampling
        for rows in prompt_rows:
            rows.logits = logits[first:first + len(rows.positions)]
            first += len(rows.positions)
        return logits[:num_sampling], sampling, prompt_rows
