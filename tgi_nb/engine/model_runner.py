"""Owns the model, its device and its paged KV cache; turns a scheduled step into one forward pass and the
sampled tokens (:meth:`ModelRunner.run`). What those tokens mean for the requests is the scheduler's
(:meth:`~tgi_nb.engine.scheduler.Scheduler.update_from_output`).

On CUDA, for our Llama-family forward with Triton available for the GPU, a step takes the GPU path
(:class:`~tgi_nb.engine.gpu_runner.GpuStepRunner`: inputs in one copy, Triton paged attention, decode steps as
CUDA graphs, sampling on the device; docs/gpu.md). Everything else, the CPU above all, runs as before."""

from __future__ import annotations

import logging
import math
import mmap
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from tgi_nb.models.attention import AttentionBatch
from tgi_nb.models.interface import CausalLM
from tgi_nb.models.llama import LlamaModel
from tgi_nb.models.triton_attention import triton_available

from .sampler import SampledToken, sample
from .scheduler import SchedulerOutput, completes
from .sequence import Sequence

logger = logging.getLogger("tgi_nb")


@dataclass
class PromptRows:
    """The rows of one prefill chunk that score prompt tokens: the row of position ``positions[i]`` gives
    prompt token ``positions[i] + 1`` the log-probability ``logprobs[i]`` and the alternatives ``top[i]``
    (token id, log-probability), filled by ``run``; ``start`` is the first of those rows in the packed batch."""

    seq: Sequence
    positions: range
    start: int
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)


@dataclass(slots=True)
class RunnerOutput:
    """What one step computed: the token sampled for each sequence of ``seqs`` (decodes, prefills whose chunk
    ends their tokens, then the samples forked from those), and the prompt log-probabilities asked for."""

    seqs: list[Sequence]
    tokens: list[SampledToken]
    prompt_rows: list[PromptRows]


def gpu_path(model: CausalLM) -> bool:
    """Whether steps of ``model`` take the GPU path: on CUDA, for our Llama-family forward, where Triton supports
    the GPU. ``TGI_NB_GPU_PATH=0`` turns it off; ``=1`` turns it on wherever Triton runs, the CPU included (Triton
    interpreted: slow, for tests of the path without a GPU).

    Example:
        >>> gpu_path(object())
        False
    """
    switch = os.environ.get("TGI_NB_GPU_PATH")
    if switch == "0" or not isinstance(model, LlamaModel):
        return False
    return (switch == "1" or model.device.type == "cuda") and triton_available(model.device)


def _prompt_rows(seq: Sequence, n: int, start: int) -> Optional[PromptRows]:
    """The rows of a prefill chunk of ``n`` tokens at ``start`` in the packed batch that score prompt tokens, when
    the request asked for prompt log-probabilities (the row of position p scores prompt token p + 1)."""
    if seq.request.prompt_logprobs is None or seq.num_output_tokens:
        return None
    cached = seq.num_computed_tokens
    return PromptRows(seq, range(cached, min(cached + n, len(seq.request.prompt_token_ids) - 1)), start)


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


@dataclass(slots=True)
class StepInputs:
    """One step's packed model inputs: token ids, positions, attention metadata and the rows to compute logits
    for (one per sequence in ``sampling``, then the prompt-scoring rows of ``prompt_rows``)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    batch: AttentionBatch
    logits_indices: torch.Tensor
    sampling: list[Sequence]
    prompt_rows: list[PromptRows]


class ModelRunner:
    """Allocates ``num_blocks`` KV blocks per layer (of ``kv_dtype``, default the model's) on the model's device
    and runs packed steps: :meth:`prepare` builds the inputs, :meth:`run` computes and samples.

    Example:
        >>> runner = ModelRunner(model, num_blocks=256, block_size=16)    # doctest: +SKIP
        >>> step = scheduler.schedule()                                   # doctest: +SKIP
        >>> outputs = scheduler.update_from_output(step, runner.run(step))  # doctest: +SKIP
    """

    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, kv_dtype: Optional[torch.dtype] = None,
                 *, max_num_seqs: int = 64, max_model_len: Optional[int] = None, enforce_eager: bool = False):
        self.model = model
        self.device = model.device
        self.block_size = block_size
        spec = model.spec
        gpu = gpu_path(model)
        # the GPU path's CUDA graphs pad their batches with rows that write to one spare block, never handed out
        shape = (num_blocks + gpu, block_size, spec.num_kv_heads, spec.head_dim)
        self.kv_caches = allocate_kv_caches(spec.num_layers, shape, kv_dtype or model.dtype, self.device)
        self.gpu = None
        if self.device.type == "cuda" and not gpu:
            logger.info("GPU path off (%s): torch attention, eager steps, sampling on the host",
                        "not our Llama-family forward" if not isinstance(model, LlamaModel) else
                        "Triton is missing or does not support this GPU, or TGI_NB_GPU_PATH=0; see docs/gpu.md")
        if gpu:
            from .gpu_runner import GpuStepRunner

            self.gpu = GpuStepRunner(model, self.kv_caches, block_size, max_num_seqs,
                                     max_model_len or spec.max_position_embeddings, num_blocks * block_size,
                                     enforce_eager)
            self.gpu.capture()

    def release(self) -> None:
        """Free the KV cache, the CUDA graphs and the model's weights on the device (the engine has stopped:
        pause and scale to zero give the GPU's memory back)."""
        if self.gpu is not None:
            self.gpu.release()
        self.gpu = self.model = None
        self.kv_caches = []

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for k, v in self.kv_caches:
            k[dst] = k[src]
            v[dst] = v[src]

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def run(self, step: SchedulerOutput) -> RunnerOutput:
        """Make the step's block copies, compute its tokens and sample the next token of each sequence that
        samples now (the samples forked this step from their parent's logits row); score the prompt tokens
        asked for."""
        self.copy_blocks(step.block_copies)
        if self.gpu is not None:
            return self._run_gpu(step)
        inputs = self.prepare(step)
        logits = self.model.forward(inputs.input_ids, inputs.positions, inputs.batch, self.kv_caches,
                                    inputs.logits_indices).cpu()
        sampling = inputs.sampling
        self._score_prompts(inputs.prompt_rows, logits[len(sampling):])
        logits = logits[:len(sampling)]
        if step.forks:   # the forked samples sample from their parent's row
            sampling, rows = step.sampling()
            logits = logits[rows]
        return RunnerOutput(sampling, sample(logits, sampling), inputs.prompt_rows)

    def _run_gpu(self, step: SchedulerOutput) -> RunnerOutput:
        prompt_rows = []
        start = len(step.decodes)
        for seq, n in step.prefills:
            rows = _prompt_rows(seq, n, start)
            if rows is not None:
                prompt_rows.append(rows)
            start += n
        extra = [r for rows in prompt_rows for r in range(rows.start, rows.start + len(rows.positions))]
        result = self.gpu.execute(step, extra)
        if prompt_rows:   # their own device->host copy, only for requests that ask for prompt log-probabilities
            self._score_prompts(prompt_rows, result.logits[result.num_rows:].float().cpu())
        return RunnerOutput(result.sampling, self.gpu.sample(result), prompt_rows)

    def _score_prompts(self, prompt_rows: list[PromptRows], logits: torch.Tensor) -> None:
        """``logits``: the prompt-scoring rows of every chunk, in order (they follow the sampling rows)."""
        first = 0
        for rows in prompt_rows:
            self._score_prompt(rows, logits[first:first + len(rows.positions)])
            first += len(rows.positions)

    def prepare(self, step: SchedulerOutput) -> StepInputs:
        """The step's inputs on the device: decodes first, then prefill chunks, packed without padding."""
        device = self.device
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
            rows = _prompt_rows(seq, n, start)
            if rows is not None:
                prompt_rows.append(rows)
            if completes(seq, n):
                logits_indices.append(start + n - 1)
                sampling.append(seq)

        batch = AttentionBatch(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            num_decodes=len(step.decodes),
            decode_block_tables=decode_tables,
            decode_context_lens=decode_lens,
            prefills=prefills,
        )
        for rows in prompt_rows:   # after the sampling rows
            logits_indices.extend(range(rows.start, rows.start + len(rows.positions)))
        return StepInputs(torch.tensor(input_ids, dtype=torch.long, device=device),
                          torch.tensor(positions, dtype=torch.long, device=device), batch,
                          torch.tensor(logits_indices, dtype=torch.long, device=device), sampling, prompt_rows)

    @staticmethod
    def _score_prompt(rows: PromptRows, logits: torch.Tensor) -> None:
        """Log-probability (and top alternatives) of each prompt token the chunk's rows predict."""
        request = rows.seq.request
        k = request.params.prompt_logprobs
        logprobs = torch.log_softmax(logits, dim=-1)
        targets = [request.prompt_token_ids[p + 1] for p in rows.positions]
        rows.logprobs = logprobs.gather(1, torch.tensor(targets)[:, None])[:, 0].tolist()
        if k:
            top_values, top_ids = (t.tolist() for t in logprobs.topk(k, dim=-1))
            rows.top = [list(zip(ids, values)) for ids, values in zip(top_ids, top_values)]
        else:
            rows.top = [[] for _ in targets]
