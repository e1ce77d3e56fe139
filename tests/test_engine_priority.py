"""Request priorities in the scheduler: a request of a smaller priority (interactive: 0) goes before every
request of a larger one (the Batch API's lines: 1), waiting or running: when every seat is taken, the running
one gives its seat up; equal priorities keep arrival order. Shown by the order in which requests finish on an
engine that runs one sequence at a time, with no timing: the first request's first output holds the engine
thread until every other request is queued."""

from __future__ import annotations

import threading

import pytest

from tgi_nb.engine import EngineConfig, LLMEngine, SamplingParams
from tgi_nb.engine.block_manager import BlockManager
from tgi_nb.engine.scheduler import Scheduler
from tgi_nb.engine.sequence import Request, Sequence

PARAMS = SamplingParams(max_new_tokens=3, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    with LLMEngine(EngineConfig(model_id=str(tiny_model_dir("llama")), max_num_seqs=1, max_total_tokens=512)) as eng:
        yield eng


def finish_order(engine: LLMEngine, requests: list[tuple[str, int]]) -> list[str]:
    """Submit (name, priority) pairs, the first alone in the engine until the others are queued; the names in
    the order their requests finished."""
    finished: list[str] = []
    done, running, gate = threading.Event(), threading.Event(), threading.Event()

    def on_output(name: str):
        def record(out) -> None:
            if name == requests[0][0]:
                running.set()
                gate.wait(60)   # the engine thread waits here while the rest arrive
            if out.finished:
                finished.append(name)
                if len(finished) == len(requests):
                    done.set()
        return record

    for i, (name, priority) in enumerate(requests):
        engine.add_request(f"Request {name}: tell me a story.", PARAMS, f"prio-{name}", on_output(name),
                           priority=priority)
        if i == 0:
            assert running.wait(60)   # the first one runs, alone (max_num_seqs=1), before any other is queued
    gate.set()
    assert done.wait(120)
    return finished


def test_an_interactive_request_goes_before_batch_lines_running_or_waiting(engine):
    order = finish_order(engine, [("batch-1", 1), ("batch-2", 1), ("batch-3", 1), ("interactive", 0)])
    assert order == ["interactive", "batch-1", "batch-2", "batch-3"]   # batch-1, running, gave its seat up


def test_an_interactive_request_does_not_take_an_interactive_seat(engine):
    order = finish_order(engine, [("first", 0), ("batch", 1), ("second", 0)])
    assert order == ["first", "second", "batch"]


def test_equal_priorities_keep_arrival_order(engine):
    order = finish_order(engine, [("a", 0), ("b", 0), ("c", 0), ("d", 0)])
    assert order == ["a", "b", "c", "d"]


def test_the_lowest_priority_sequence_is_preempted_first():
    """Running sequences are visited in queue order: when blocks run out, the one given up is the newest of the
    largest priority, here a batch line admitted before an interactive request (arrival order alone would give
    up the interactive one)."""
    scheduler = Scheduler(BlockManager(num_blocks=4, block_size=4), max_num_seqs=8, max_batch_prefill_tokens=64)

    def add(name: str, prompt: list[int], priority: int) -> Sequence:
        request = Request(name, prompt, SamplingParams(max_new_tokens=8), lambda _: None, 0.0, priority)
        request.seqs.append(Sequence(request, 0, list(prompt), None, None))
        scheduler.add_request(request)
        return request.seqs[0]

    def computed(seq: Sequence) -> None:   # what a step does: every scheduled token computed, one sampled
        seq.num_computed_tokens = len(seq.token_ids)
        seq.token_ids.append(99)

    batch = add("batch", [1, 2, 3, 4, 5, 6, 7], priority=1)
    assert scheduler.schedule().prefills == [(batch, 7)]           # alone: admitted, 2 blocks
    computed(batch)
    interactive = add("interactive", [11, 12, 13, 14], priority=0)
    step = scheduler.schedule()
    assert step.decodes == [batch] and step.prefills == [(interactive, 4)]
    computed(batch)
    computed(interactive)
    # Each now needs one more block and one is free: the batch line gives its blocks up.
    step = scheduler.schedule()
    assert step.decodes == [interactive] and scheduler.waiting == [batch]
