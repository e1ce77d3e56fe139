"""Continuous batching: which sequences compute how many tokens in the next step, and what a step's
sampled tokens do to them.

Every step packs one decode token for each running sequence and prefill chunks of sequences still
reading their prompt, under the step's prefill token budget and the running-sequence cap. Running
sequences come first, then waiting ones, each in the queue's order (:meth:`Scheduler.waiting_key`: priority,
then arrival), so an interactive request that arrives while the Batch API's lines run is admitted, and gets
its prefill chunks, before them; when they fill every seat, the newest of them gives its seat up. When the KV
cache has no block for a running sequence, the last running sequence in that order (the newest of the lowest
priority) is preempted: its blocks are freed and it is recomputed later (prefix caching usually gives most of
them back).

After the runner computed a step, :meth:`Scheduler.update_from_output` does everything the sampled
tokens imply: token accounting, publishing full blocks to the prefix cache, starting a request's other
samples once its prompt is computed (the ``n``-sample fork), detokenizing, every stop condition, and the
outputs to send. The scheduler owns the requests from admission to finish.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Optional

from .block_manager import BlockManager
from .detokenizer import TokenTexts
from .outputs import CompletionDelta, RequestOutput
from .sequence import Request, Sequence, SequenceStatus

if TYPE_CHECKING:  # the runner imports this module
    from .model_runner import RunnerOutput
    from .sampler import SampledToken

logger = logging.getLogger("tgi_nb")


def completes(seq: Sequence, num_tokens: int) -> bool:
    """Whether computing ``num_tokens`` more of ``seq`` reaches its last token: the step then samples it."""
    return seq.num_computed_tokens + num_tokens == len(seq.token_ids)


@dataclass(slots=True)
class SchedulerOutput:
    """One step's work: decodes (one token each) first, then (sequence, chunk length) prefills; the block
    copies to make first (copy-on-write); the pending samples of requests whose prompt ends this step
    (parent -> children: they sample from the parent's logits and then share its blocks)."""

    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    forks: dict[Sequence, list[Sequence]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills

    def sampling(self) -> tuple[list[Sequence], list[int]]:
        """The sequences that sample this step and the logits row each samples from: the decodes and the prefills
        whose chunk ends their tokens (rows 0, 1, ...), then the forked samples, each from its parent's row.

        Example:
            >>> SchedulerOutput().sampling()
            ([], [])
        """
        seqs = list(self.decodes) + [seq for seq, n in self.prefills if completes(seq, n)]
        rows = list(range(len(seqs)))
        for row, seq in enumerate(list(seqs)):
            for child in self.forks.get(seq, ()):
                seqs.append(child)
                rows.append(row)
        return seqs, rows


class Scheduler:
    """Keeps the requests, the waiting queue and the running list; fills each step and applies its output.

    ``eos_token_ids`` stop a sample (unless it ignores EOS); ``token_texts`` words log-probability entries.

    Example:
        >>> s = Scheduler(BlockManager(64, 16), max_num_seqs=8, max_batch_prefill_tokens=256)
        >>> s.schedule().empty
        True
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_batch_prefill_tokens: int,
                 eos_token_ids: Iterable[int] = (), token_texts: Optional[TokenTexts] = None):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_batch_prefill_tokens = max_batch_prefill_tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        self.token_texts = token_texts
        self.requests: dict[str, Request] = {}
        self.waiting: list[Sequence] = []   # sorted by waiting_key
        self.running: list[Sequence] = []
        # Counters for EngineStats, read from other threads (a value may be one step old).
        self.num_preemptions = 0
        self.num_steps = 0
        self.last_batch_size = 0
        self.prompt_tokens_total = 0
        self.generated_tokens_total = 0
        self.prefix_cache_hit_tokens = 0
        # Keep a few blocks back when admitting new work so running sequences can grow a little
        # before anything has to be preempted.
        self._watermark = max(1, block_manager.num_blocks // 100)

    # ------------------------------------------------------------------ queues
    def waiting_key(self, seq: Sequence) -> tuple:
        """The queue's order: the request's priority (smaller first), then arrival (sequence ids are handed out
        as requests are added). A preempted sequence keeps its key, so it goes back ahead of everything of its
        priority that arrived after it."""
        return (seq.request.priority, seq.seq_id)

    def add_request(self, request: Request) -> None:
        """Queue a request; its first sample waits, the others wait for its prompt (FORK_PENDING)."""
        self.requests[request.request_id] = request
        self._enqueue(request.seqs[0])

    def _enqueue(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=self.waiting_key)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        self._yield_seats()
        out = SchedulerOutput()
        bm = self.block_manager
        budget = self.max_batch_prefill_tokens
        queue = deque(sorted(self.running, key=self.waiting_key))
        scheduled: list[Sequence] = []
        while queue:
            seq = queue.popleft()
            n = seq.num_uncomputed
            if n > 1:
                n = min(n, budget)
                if n == 0:
                    scheduled.append(seq)   # keeps its blocks; its next chunk waits for budget
                    continue
            copies = bm.allocate(seq, n)
            while copies is None:
                if not queue:
                    break
                self._preempt(queue.pop())
                copies = bm.allocate(seq, n)
            if copies is None:
                self._preempt(seq)
                continue
            out.block_copies.extend(copies)
            scheduled.append(seq)
            self._add_to_step(out, seq, n)
            if seq.num_uncomputed > 1:   # a prefill chunk; decodes are not in the prefill budget
                budget -= n
        self.running = scheduled

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # a request that wants its prompt's log-probabilities computes every prompt token itself
            if not seq.block_table and seq.request.prompt_logprobs is None:
                cached = bm.match_prefix(seq)
                if seq.num_output_tokens == 0:
                    seq.request.num_cached_tokens = max(seq.request.num_cached_tokens, cached)
            n = min(seq.num_uncomputed, budget)
            copies = None
            if bm.blocks_needed(seq, n) + self._watermark <= bm.num_free or not self.running:
                copies = bm.allocate(seq, n)
            if copies is None:
                bm.free(seq)   # give back the prefix it matched; it stays cached for next time
                break
            self.waiting.pop(0)
            if seq.request.first_scheduled is None:
                seq.request.first_scheduled = time.monotonic()
                self.prefix_cache_hit_tokens += seq.num_computed_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.block_copies.extend(copies)
            self._add_to_step(out, seq, n)
            budget -= n
        return out

    def _yield_seats(self) -> None:
        """When every seat (``max_num_seqs``) is taken, give up running sequences of a larger priority than
        waiting ones, lowest priority and newest first: an interactive request does not wait for batch lines to
        end. (A sequence given up is recomputed later, most of it from the prefix cache.)"""
        running = sorted(self.running, key=self.waiting_key)
        for seq in list(self.waiting):
            if len(running) < self.max_num_seqs or seq.request.priority >= running[-1].request.priority:
                break
            victim = running.pop()
            self.running.remove(victim)
            self._preempt(victim)

    def _add_to_step(self, out: SchedulerOutput, seq: Sequence, n: int) -> None:
        """Put ``n`` tokens of ``seq`` in the step (a decode when it is its last)."""
        if completes(seq, n) and seq.index == 0 and seq.num_output_tokens == 0:
            # the prompt is done this step: the request's other samples start from its logits
            children = [c for c in seq.request.seqs[1:] if c.status is SequenceStatus.FORK_PENDING]
            if children:
                out.forks[seq] = children
        if seq.num_uncomputed == 1:
            out.decodes.append(seq)
        else:
            out.prefills.append((seq, n))

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        self._enqueue(seq)
        self.num_preemptions += 1

    def _finish_seq(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    # ------------------------------------------------------------------ after the step
    def update_from_output(self, step: SchedulerOutput, output: "RunnerOutput"
                           ) -> list[tuple[Request, RequestOutput]]:
        """Apply a computed step: count the computed tokens and publish their full blocks, record prompt
        log-probabilities, start the samples forked this step, append each sampled token (detokenized, every
        stop condition checked) and return each request's output, to be sent by the caller."""
        bm = self.block_manager
        self.num_steps += 1
        self.last_batch_size = len(step.decodes) + len(step.prefills)
        self.generated_tokens_total += len(step.decodes)
        for seq in step.decodes:
            seq.num_computed_tokens += 1
            bm.register_computed(seq)
        for seq, n in step.prefills:
            seq.num_computed_tokens += n
            self.prompt_tokens_total += n
            bm.register_computed(seq)
        for rows in output.prompt_rows:
            request = rows.seq.request
            for position, logprob, top in zip(rows.positions, rows.logprobs, rows.top):
                # the row of position p scores prompt token p + 1
                request.prompt_logprobs[position + 1] = self.token_texts.logprob(
                    request.prompt_token_ids[position + 1], logprob, top)
        for parent, children in step.forks.items():   # after the parent's blocks are published
            for child in children:
                bm.fork(parent, child)
                child.status = SequenceStatus.RUNNING
                self.running.append(child)

        deltas: dict[str, list[CompletionDelta]] = {}
        for seq, token in zip(output.seqs, output.tokens):
            deltas.setdefault(seq.request.request_id, []).append(self._append_token(seq, token))
        outputs = []
        for request_id, request_deltas in deltas.items():
            request = self.requests[request_id]
            queue_time = None
            if not request.started:
                request.started = True
                queue_time = request.first_scheduled - request.arrival
            finished = request.finished
            if finished:
                del self.requests[request_id]
            outputs.append((request, RequestOutput(
                request_id, request.prompt_token_ids, request_deltas, finished, request.num_cached_tokens,
                queue_time=queue_time, prompt_logprobs=request.prompt_logprobs if queue_time is not None else None)))
        return outputs

    def _append_token(self, seq: Sequence, token: "SampledToken") -> CompletionDelta:
        """Add a sampled token to a sample, detokenize, check every stop condition. (The prompt and
        ``max_new_tokens`` were checked against ``max_total_tokens`` when the request came in, so
        ``max_new_tokens`` is the one length limit here.)"""
        params = seq.request.params
        token_id = token.token_id
        seq.append_token(token_id)
        detok = seq.detokenizer
        finish, stop_reason = None, None
        if token.error is not None:
            finish = "error"
            logger.warning("request %s failed: %s", seq.request.request_id, token.error)
        elif token_id in self.eos_token_ids and not params.ignore_eos:
            finish = "stop"
        elif token_id in params.stop_token_ids:
            finish, stop_reason = "stop", token_id
        else:
            added = len(detok.add_token(token_id))
            stop_reason = detok.check_stop(added)
            if stop_reason is not None:
                finish = "stop"
        if finish is None and seq.num_output_tokens >= params.max_new_tokens:
            finish = "length"
            stop_reason = detok.check_stop(detok.flush())
            if stop_reason is not None:
                finish = "stop"
        logprobs = None
        if token.logprob is not None:
            logprobs = [self.token_texts.logprob(token_id, token.logprob, token.top or [])]
        delta = CompletionDelta(seq.index, detok.take_output(final=finish is not None), [token_id], logprobs,
                                finish, stop_reason)
        if finish is not None:
            seq.finish_reason, seq.stop_reason = finish, stop_reason
            self._finish_seq(seq)
        return delta

    # ------------------------------------------------------------------ finishing early
    def finish_request(self, request_id: str, reason: str, error: Optional[str] = None
                       ) -> Optional[tuple[Request, RequestOutput]]:
        """End a request now (``abort``, ``error``): free its blocks and return its last output, or None when
        it is not here (already finished)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        deltas = []
        for seq in request.seqs:
            if seq.status is not SequenceStatus.FINISHED:
                self._finish_seq(seq)
                seq.finish_reason = reason
                deltas.append(CompletionDelta(seq.index, seq.detokenizer.take_output(final=True), [],
                                              finish_reason=reason))
        return request, RequestOutput(request.request_id, request.prompt_token_ids, deltas, True,
                                      request.num_cached_tokens, error)

    def fail_running(self, error: str) -> list[tuple[Request, RequestOutput]]:
        """End every request with a running sample (their step failed) with ``error``; the waiting ones stay."""
        return [self.finish_request(request_id, "error", error) for request_id, request in list(self.requests.items())
                if any(s.status is SequenceStatus.RUNNING for s in request.seqs)]

    def finish_all(self, reason: str) -> list[tuple[Request, RequestOutput]]:
        """End every request (the engine stops)."""
        return [self.finish_request(request_id, reason) for request_id in list(self.requests)]
