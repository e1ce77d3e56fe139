"""A step on the GPU: inputs in one copy, the model's paged forward, decode steps as CUDA graphs, batched sampling.

:class:`GpuStepRunner` is the device half of the model runner when the model runs on CUDA (the CPU path keeps its
fused native decode step untouched). Per step it makes one host->device copy, of the step's inputs
(:class:`~tgi_nb.engine.step_inputs.StepPacker`) and its sampling parameters together, and one device->host copy of
the sampled tokens and log-probabilities (:class:`~tgi_nb.engine.device_sampler.DeviceSampler`). A step of decodes only
replays the CUDA graph of its batch-size bucket (:class:`~tgi_nb.engine.cuda_graphs.DecodeGraphs`); a step with
prefill chunks runs eagerly, attention included in one Triton launch per layer
(:func:`~tgi_nb.models.triton_attention.paged_attention`).

Padding rows of a graph write their K/V to ``pad_slot``, a slot of a block the block manager never hands out,
and attend to nothing (context length 0).

Everything here also runs on the CPU (Triton interpreted, the graph runner's stand-in), which is how CI checks it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from tgi_nb.models.triton_attention import PagedBatch

from .cuda_graphs import DecodeGraphs, StaticInput
from .device_sampler import DeviceSampler, SamplingBatch
from .sampler import SampledToken
from .scheduler import SchedulerOutput, completes
from .sequence import Sequence
from .step_inputs import DeviceViews, Field, StepLayout, StepPacker


@dataclass(slots=True)
class StepResult:
    """A computed step: its logits on the device (``num_rows`` sampling rows, then any extra rows asked for), the
    sequences that sample (forked samples included), and their sampling inputs, copied with the step's."""

    logits: torch.Tensor
    num_rows: int
    sampling: list[Sequence]
    layout: StepLayout
    prepared: SamplingBatch
    views: DeviceViews
    fork_rows: Optional[Field]     # the logits row each sampling sequence reads, when samples were forked


class GpuStepRunner:
    """Runs scheduled steps of ``model`` (a :class:`~tgi_nb.models.llama.LlamaModel`) over ``kv_caches``.

    Example:
        >>> runner = GpuStepRunner(model, kv_caches, block_size=16, max_num_seqs=64,   # doctest: +SKIP
        ...                        max_model_len=4096, pad_slot=num_blocks * 16)
        >>> runner.capture()                                   # once, after the KV cache exists  # doctest: +SKIP
        >>> result = runner.execute(scheduler.schedule())                                      # doctest: +SKIP
        >>> tokens = runner.sample(result)            # one per sequence of result.sampling    # doctest: +SKIP
    """

    def __init__(self, model, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int,
                 max_num_seqs: int, max_model_len: int, pad_slot: int, enforce_eager: bool = False):
        self.model = model
        self.kv_caches = kv_caches
        self.device = model.device
        self.inputs = StepPacker(self.device, block_size, -(-max_model_len // block_size))
        self.sampler = DeviceSampler(model.spec.vocab_size, self.device)
        # the decode graphs' query_start_loc and logits rows: 0..n, the same for every step of n sequences
        self._arange32 = torch.arange(max_num_seqs + 1, dtype=torch.int32, device=self.device)
        self._arange64 = self._arange32.long()
        width = self.inputs.block_table_width
        self.graphs = DecodeGraphs(self._decode, {
            "input_ids": StaticInput((), torch.int32, 0),
            "positions": StaticInput((), torch.int32, 0),
            "slot_mapping": StaticInput((), torch.int64, pad_slot),
            "seq_lens": StaticInput((), torch.int32, 0),
            "block_tables": StaticInput((width,), torch.int32, 0),
        }, max_num_seqs, self.device, enforce_eager)

    def capture(self) -> None:
        """Capture the decode graphs (a no-op on the CPU or with ``enforce_eager``), in inference mode as the
        engine's loop runs them."""
        with torch.inference_mode():
            self.graphs.capture()

    def release(self) -> None:
        """Drop the graphs and staging buffers' device memory (pause / scale to zero)."""
        self.graphs.release()

    def _decode(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                seq_lens: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[0]
        batch = PagedBatch(slot_mapping, seq_lens, self._arange32[:n + 1], block_tables, max_query_len=1)
        return self.model.forward(input_ids, positions, batch, self.kv_caches, self._arange64[:n])

    def execute(self, step: SchedulerOutput, extra_logits_rows: Optional[list[int]] = None) -> StepResult:
        """Compute a step (decodes first, then prefill chunks): the logits of the rows that sample now, followed by
        ``extra_logits_rows`` (packed-batch rows, e.g. those that score prompt tokens; they force an eager step).
        The step's inputs and its sampling parameters go to the device in one copy."""
        decodes, prefills = step.decodes, step.prefills
        buf = self.inputs.buffer
        buf.reset()
        layout = self.inputs.build(decodes, prefills)
        extra = buf.add(extra_logits_rows, torch.int64) if extra_logits_rows else None
        sampling, row_of = step.sampling()
        num_rows = len(decodes) + sum(completes(s, n) for s, n in prefills)
        fork_rows = buf.add(row_of, torch.int64) if len(row_of) != num_rows else None
        prepared = self.sampler.prepare(sampling, buf)
        views = buf.to_device()
        ids, positions = views[layout.input_ids], views[layout.positions]
        if decodes and not prefills and extra is None:
            logits = self.graphs.run(input_ids=ids, positions=positions, slot_mapping=views[layout.slot_mapping],
                                     seq_lens=views[layout.seq_lens], block_tables=views[layout.block_tables])
        else:
            rows = views[layout.logits_indices]
            if extra is not None:
                rows = torch.cat([rows, views[extra]])
            batch = PagedBatch(views[layout.slot_mapping], views[layout.seq_lens], views[layout.query_start_loc],
                               views[layout.block_tables], layout.max_query_len)
            logits = self.model.forward(ids, positions, batch, self.kv_caches, rows)
        return StepResult(logits, num_rows, sampling, layout, prepared, views, fork_rows)

    def sample(self, result: StepResult) -> list[SampledToken]:
        """The next token of each sampling sequence of a computed step: one device->host copy."""
        logits = result.logits[:result.num_rows]
        if result.fork_rows is not None:
            logits = logits.index_select(0, result.views[result.fork_rows])
        return self.sampler.sample(logits, result.sampling, result.prepared, result.views)
