"""Sequences (one sample of a request) and requests (a prompt with its ``n`` samples)."""

from __future__ import annotations

import enum
import itertools
from typing import Callable, Optional

import torch

from .detokenizer import IncrementalDetokenizer
from .outputs import RequestOutput
from .sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"      # needs (re)computing from scratch, holds no blocks
    RUNNING = "running"      # holds blocks, scheduled every step
    FORK_PENDING = "fork"    # sample i > 0 of a request whose prompt is not computed yet
    FINISHED = "finished"


_seq_counter = itertools.count()


class Sequence:
    """One sample: its tokens, how many of them have K/V in the cache, and where (block table).

    Tokens past ``num_computed_tokens`` are the input of the next step: the whole prompt (in chunks)
    at first, one token per step while decoding, everything again after a preemption.
    """

    __slots__ = ("seq_id", "request", "index", "token_ids", "num_prompt_tokens", "num_computed_tokens",
                 "block_table", "block_hashes", "status", "generator", "detokenizer", "finish_reason",
                 "stop_reason", "output_counts", "logits_processor")

    def __init__(self, request: "Request", index: int, token_ids: list[int],
                 detokenizer: IncrementalDetokenizer, generator: Optional[torch.Generator]):
        self.seq_id = next(_seq_counter)
        self.request = request
        self.index = index
        self.token_ids = token_ids
        self.num_prompt_tokens = len(token_ids)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []   # chained hashes of the full blocks registered so far
        self.status = SequenceStatus.WAITING
        self.generator = generator
        self.detokenizer = detokenizer
        self.finish_reason: Optional[str] = None
        self.stop_reason: Optional[str | int] = None
        self.output_counts: dict[int, int] = {}   # generated token -> count, for OpenAI penalties
        params = request.params
        # This sample's own processor when the request has a factory (its state follows these tokens only).
        self.logits_processor = (params.logits_processor_factory() if params.logits_processor_factory
                                 else params.logits_processor)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.output_counts[token_id] = self.output_counts.get(token_id, 0) + 1

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request.request_id}, len={len(self.token_ids)}, "
                f"computed={self.num_computed_tokens}, status={self.status.value})")


class Request:
    """A prompt and its ``n`` samples; outputs go to ``on_output`` from the engine thread."""

    __slots__ = ("request_id", "prompt_token_ids", "params", "seqs", "on_output", "arrival",
                 "num_cached_tokens", "first_scheduled", "started", "prompt_logprobs", "priority",
                 "logit_bias")

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 on_output: Callable[[RequestOutput], None], arrival: float, priority: int = 0):
        self.request_id = request_id
        self.priority = priority   # smaller first: interactive requests (0) before the Batch API's lines
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.seqs: list[Sequence] = []
        self.on_output = on_output
        self.arrival = arrival
        self.num_cached_tokens = 0
        self.first_scheduled: Optional[float] = None
        self.started = False   # has produced its first output
        # position i: log-probability of prompt token i given the ones before it (None for token 0);
        # filled during prefill when params.prompt_logprobs is set, sent with the first output
        self.prompt_logprobs: Optional[list] = (
            [None] * len(prompt_token_ids) if params.prompt_logprobs is not None else None)
        # params.logit_bias as (token ids, biases), built once here rather than at every step of every sample
        self.logit_bias: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        if params.logit_bias:
            self.logit_bias = (torch.tensor(list(params.logit_bias), dtype=torch.long),
                               torch.tensor(list(params.logit_bias.values()), dtype=torch.float32))

    @property
    def finished(self) -> bool:
        return all(s.status is SequenceStatus.FINISHED for s in self.seqs)
