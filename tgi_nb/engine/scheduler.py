"""Continuous batching: which sequences compute how many tokens in the next step.

Every step packs one decode token for each running sequence and prefill chunks of sequences still
reading their prompt, under the step's prefill token budget and the running-sequence cap. Running
sequences come first (oldest first), then waiting ones in arrival order. When the KV cache has no
block for a running sequence, the newest running sequence is preempted: its blocks are freed and it
is recomputed later (prefix caching usually gives most of them back).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class SchedulerOutput:
    """One step's work: decodes (one token each) first, then (sequence, chunk length) prefills."""

    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    # sequences of requests scheduled for the first time this step (a 1-token or fully cached prompt
    # starts as a decode, so neither list alone tells)
    admitted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    """Keeps the waiting queue and the running list and fills each step.

    Example:
        >>> s = Scheduler(BlockManager(64, 16), max_num_seqs=8, max_batch_prefill_tokens=256)
        >>> s.schedule().empty
        True
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_batch_prefill_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_batch_prefill_tokens = max_batch_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Keep a few blocks back when admitting new work so running sequences can grow a little
        # before anything has to be preempted.
        self._watermark = max(1, block_manager.num_blocks // 100)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        bm = self.block_manager
        budget = self.max_batch_prefill_tokens
        queue = deque(self.running)
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
            if seq.num_uncomputed == 1:
                out.decodes.append(seq)
            else:
                out.prefills.append((seq, n))
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
            self.waiting.popleft()
            if seq.request.first_scheduled is None:
                out.admitted.append(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.block_copies.extend(copies)
            if seq.num_uncomputed == 1:
                out.decodes.append(seq)
            else:
                out.prefills.append((seq, n))
            budget -= n
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def add_running(self, seq: Sequence) -> None:
        """Start a forked sample that already shares its parent's blocks."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
