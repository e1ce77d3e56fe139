"""The scheduler alone (no model): one step is schedule -> run -> update, and update_from_output does the
post-processing the engine did before (token accounting, the n-sample fork, stop checks, outputs).

The runner's part is played by a RunnerOutput built here with the tokens a model would have sampled."""

from __future__ import annotations

import pytest

from tgi_nb.engine import SamplingParams
from tgi_nb.engine.block_manager import BlockManager
from tgi_nb.engine.detokenizer import IncrementalDetokenizer, TokenTexts
from tgi_nb.engine.model_runner import RunnerOutput
from tgi_nb.engine.sampler import SampledToken
from tgi_nb.engine.scheduler import Scheduler
from tgi_nb.engine.sequence import Request, Sequence, SequenceStatus

EOS = 2


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def make_request(tokenizer, request_id: str, prompt: list[int], **params) -> Request:
    """A request as LLMEngine.add_request builds it: sample 0 waits, the others wait for its prompt."""
    p = SamplingParams(temperature=0, **params)
    request = Request(request_id, prompt, p, lambda _: None, arrival=0.0)
    for index in range(p.n):
        seq = Sequence(request, index, list(prompt), IncrementalDetokenizer(tokenizer, prompt, p.stop), None)
        if index:
            seq.status = SequenceStatus.FORK_PENDING
        request.seqs.append(seq)
    return request


def make_scheduler(tokenizer, num_blocks: int = 64) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, 4), max_num_seqs=8, max_batch_prefill_tokens=64,
                     eos_token_ids={EOS}, token_texts=TokenTexts(tokenizer))


def test_a_prompt_step_forks_the_other_samples_and_counts_its_tokens(tokenizer):
    scheduler = make_scheduler(tokenizer)
    request = make_request(tokenizer, "a", list(range(100, 118)), n=2, max_new_tokens=5)
    parent, child = request.seqs
    scheduler.add_request(request)

    step = scheduler.schedule()
    assert step.prefills == [(parent, 18)] and step.forks == {parent: [child]}
    assert child.status is SequenceStatus.FORK_PENDING   # forked only once the prompt is computed
    outputs = scheduler.update_from_output(step, RunnerOutput([parent, child], [SampledToken(500),
                                                                                SampledToken(501)], []))

    assert [out.request_id for _, out in outputs] == [request.request_id]
    out = outputs[0][1]
    assert [(d.index, d.token_ids) for d in out.outputs] == [(0, [500]), (1, [501])] and not out.finished
    assert child.status is SequenceStatus.RUNNING and child in scheduler.running
    # the child shares the parent's four full prompt blocks; the partial fifth is copied on its first write
    assert child.block_table == parent.block_table and child.num_computed_tokens == 18
    assert all(scheduler.block_manager.ref_counts[b] == 2 for b in parent.block_table)
    assert (scheduler.num_steps, scheduler.prompt_tokens_total, scheduler.generated_tokens_total) == (1, 18, 0)

    step = scheduler.schedule()
    assert step.decodes == [parent, child] and step.block_copies and not step.forks
    scheduler.update_from_output(step, RunnerOutput([parent, child], [SampledToken(600), SampledToken(601)], []))
    assert scheduler.generated_tokens_total == 2 and scheduler.last_batch_size == 2


@pytest.mark.parametrize("token, max_new_tokens, finish", [(EOS, 5, "stop"), (700, 1, "length")])
def test_a_stop_condition_finishes_the_request_and_frees_its_blocks(tokenizer, token, max_new_tokens, finish):
    scheduler = make_scheduler(tokenizer)
    request = make_request(tokenizer, "a", list(range(100, 110)), max_new_tokens=max_new_tokens)
    scheduler.add_request(request)
    step = scheduler.schedule()
    (_, out), = scheduler.update_from_output(step, RunnerOutput([request.seqs[0]], [SampledToken(token)], []))
    assert out.finished and out.outputs[0].finish_reason == finish
    assert out.queue_time is not None   # the first output says how long the request waited
    assert not scheduler.requests and not scheduler.has_work() and scheduler.block_manager.num_used == 0


def test_the_waiting_queue_is_ordered_by_its_key_and_finish_request_ends_a_waiting_request(tokenizer):
    scheduler = make_scheduler(tokenizer)
    first = make_request(tokenizer, "first", [100, 101, 102])
    second = make_request(tokenizer, "second", [100, 101, 103])
    scheduler.add_request(second)
    scheduler.add_request(first)   # arrived first (its sequences are older): goes ahead
    assert scheduler.waiting == [first.seqs[0], second.seqs[0]]

    request, out = scheduler.finish_request(second.request_id, "abort")
    assert request is second and out.finished and out.outputs[0].finish_reason == "abort"
    assert scheduler.waiting == [first.seqs[0]] and scheduler.finish_request(second.request_id, "abort") is None
    assert [out.request_id for _, out in scheduler.finish_all("abort")] == [first.request_id]
    assert not scheduler.has_work()
