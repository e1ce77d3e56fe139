"""The GPU path's batched sampler (tgi_nb.engine.device_sampler), run on the CPU, against the row-by-row sampler
of the CPU path: the same greedy tokens and log-probabilities with penalties, logit bias and grammars; the same
truncation (top-k, top-p, min-p); seeded rows that do not depend on their neighbours; the noise's statistics."""

from __future__ import annotations

import math

import pytest
import torch

from tgi_nb.engine import sampler
from tgi_nb.engine.device_sampler import _GREEDY, _KEY1, _KEY2, DeviceSampler, mix32, noise_keys
from tgi_nb.engine.sampling_params import SamplingParams
from tgi_nb.engine.sequence import Request, Sequence

VOCAB = 300


def make_seq(params: SamplingParams, prompt=(1, 2, 3, 2), output=(), seed=None) -> Sequence:
    request = Request("r", list(prompt), params, lambda _: None, 0.0)
    generator = None
    if not params.greedy:
        generator = torch.Generator().manual_seed(params.seed if seed is None else seed)
    seq = Sequence(request, 0, list(prompt), None, generator)
    for t in output:
        seq.append_token(t)
    return seq


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=g) * 3


GREEDY_CASES = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0, logprobs=0),
    SamplingParams(temperature=0, logprobs=5, repetition_penalty=1.7),
    SamplingParams(temperature=0, frequency_penalty=1.5, presence_penalty=0.7, logprobs=3),
    SamplingParams(temperature=0, repetition_penalty=0.6, frequency_penalty=-1.0),
    SamplingParams(temperature=0, logit_bias={5: 100.0, 6: -50.0, VOCAB + 3: 5.0}),
    SamplingParams(top_k=1, logprobs=2),
    SamplingParams(do_sample=False, logit_bias={7: 8.0}, presence_penalty=2.0),
]


def test_greedy_tokens_and_logprobs_match_the_cpu_sampler():
    outputs = [(5, 5, 9), (), (7, 7, 7, 40), (120, 4), (), (), (3,), (7, 11)]
    seqs_a = [make_seq(p, output=o) for p, o in zip(GREEDY_CASES, outputs)]
    seqs_b = [make_seq(p, output=o) for p, o in zip(GREEDY_CASES, outputs)]
    for step in range(3):
        logits = random_logits(len(seqs_a), seed=step)
        expected = sampler.sample(logits.clone(), seqs_a)
        got = DeviceSampler(VOCAB, torch.device("cpu")).sample(logits.clone(), seqs_b)
        for e, g in zip(expected, got):
            assert g.token_id == e.token_id and g.error is None
            if e.logprob is None:
                assert g.logprob is None and g.top is None
            else:
                assert g.logprob == pytest.approx(e.logprob, abs=1e-5)
                assert [t for t, _ in g.top] == [t for t, _ in e.top]
                assert [v for _, v in g.top] == pytest.approx([v for _, v in e.top], abs=1e-5)
        for a, b, e in zip(seqs_a, seqs_b, expected):   # the penalties see the new tokens next step
            a.append_token(e.token_id)
            b.append_token(e.token_id)


def test_grammar_bitmasks_and_custom_processors(smollm2_dir):
    from transformers import AutoTokenizer

    from tgi_nb.engine.guided_decoding import GrammarCompiler, choice_grammar

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    vocab = 49152
    grammar = GrammarCompiler.for_tokenizer(tok, vocab, [2]).compile(choice_grammar(["yes", "no", "maybe so"]))
    boom = SamplingParams(temperature=0, logits_processor=lambda ids, row: 1 / 0)
    force9 = SamplingParams(temperature=0,
                            logits_processor=lambda ids, row: row.index_fill_(0, torch.tensor([9]), 50.0))

    def seqs():
        return [make_seq(SamplingParams(temperature=0, logits_processor_factory=grammar.processor)),
                make_seq(boom), make_seq(force9), make_seq(SamplingParams(temperature=0)),
                make_seq(SamplingParams(temperature=0, logits_processor_factory=grammar.processor))]

    seqs_a, seqs_b = seqs(), seqs()
    device_sampler = DeviceSampler(vocab, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        logits = torch.randn(len(seqs_a), vocab, generator=g)
        expected = sampler.sample(logits.clone(), seqs_a)
        got = device_sampler.sample(logits.clone(), seqs_b)
        assert [t.token_id for t in got] == [t.token_id for t in expected]
        assert got[1].error and "ZeroDivisionError" in got[1].error
        assert [t.error is None for i, t in enumerate(got) if i != 1] == [True] * 4
        assert got[2].token_id == 9
        for a, b, e in zip(seqs_a, seqs_b, expected):
            a.append_token(e.token_id)
            b.append_token(e.token_id)
    text = tok.decode(seqs_b[0].output_token_ids)
    assert any(text.startswith(c) for c in ("yes", "no", "maybe so"))


@pytest.mark.parametrize("params", [
    SamplingParams(top_k=5), SamplingParams(top_p=0.5), SamplingParams(top_p=0.9, top_k=20),
    SamplingParams(min_p=0.2), SamplingParams(temperature=0.3, top_p=0.8, min_p=0.05), SamplingParams(),
    SamplingParams(temperature=2.0, top_k=50, top_p=0.95, min_p=0.01),
])
def test_truncation_keeps_the_same_tokens_as_the_cpu_sampler(params):
    """The tokens a sampled row may draw are those the CPU sampler's truncation keeps, row by row, whatever the
    other rows ask for (a row without top-k/top-p in a batch that sorts must keep every token)."""
    rows = [params, SamplingParams(top_k=3, seed=1), SamplingParams(temperature=0), SamplingParams(seed=2)]
    seqs = [make_seq(p, seed=i) for i, p in enumerate(rows)]
    logits = random_logits(len(seqs), seed=3)
    ds = DeviceSampler(VOCAB, torch.device("cpu"))
    batch = ds.prepare(seqs)
    views = ds.buffer.to_device()
    floats, ints = views[batch.floats], views[batch.ints]
    scaled = ds._truncate(ds._process(logits, batch, views) / floats[:, 0, None], batch, floats, ints)
    for i, p in enumerate(rows):
        if p.greedy:
            continue
        expected = sampler._truncate(logits[i] / p.temperature, p.top_k, p.top_p, p.min_p)
        assert torch.equal(torch.isfinite(scaled[i]), torch.isfinite(expected))
    for _ in range(3):   # and every draw lies in that support
        tokens = [t.token_id for t in ds.sample(logits, seqs)]
        for i, p in enumerate(rows):
            assert torch.isfinite(scaled[i, tokens[i]]) or p.greedy
            seqs[i].append_token(tokens[i])


def test_seeded_rows_do_not_depend_on_their_neighbours():
    target = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, frequency_penalty=0.3)
    neighbours = [SamplingParams(temperature=0), SamplingParams(top_k=4, seed=5), SamplingParams(min_p=0.1),
                  SamplingParams(temperature=1.5, logit_bias={3: 10.0}, logprobs=4)]
    ds = DeviceSampler(VOCAB, torch.device("cpu"))
    alone, batched, steps = make_seq(target), make_seq(target), 12
    others = [make_seq(p, seed=100 + i) for i, p in enumerate(neighbours)]
    for step in range(steps):
        logits = random_logits(1, seed=50 + step)
        token = ds.sample(logits, [alone])[0].token_id
        # the row's position changes from step to step, among other rows with other logits
        order = others[:step % 5] + [batched] + others[step % 5:]
        full = torch.cat([random_logits(len(order), seed=900 + step)])
        full[order.index(batched)] = logits[0]
        tokens = ds.sample(full, order)
        assert tokens[order.index(batched)].token_id == token
        alone.append_token(token)
        batched.append_token(token)
        for seq, t in zip(order, tokens):
            if seq is not batched:
                seq.append_token(t.token_id)
    assert len(set(alone.output_token_ids)) > 3   # it did sample, not argmax


def test_same_seed_same_tokens_and_seeds_differ():
    ds = DeviceSampler(VOCAB, torch.device("cpu"))
    logits = torch.zeros(3, VOCAB)   # uniform: the noise alone decides
    seqs = [make_seq(SamplingParams(seed=s)) for s in (7, 7, 8)]
    a, b, c = (t.token_id for t in ds.sample(logits, seqs))
    assert a == b and a != c


def test_noise_hash_is_the_same_on_tensors_and_integers():
    values = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 123456789]
    assert mix32(torch.tensor(values)).tolist() == [mix32(v) for v in values]
    keys = {noise_keys(seed, step) for seed in range(50) for step in range(50)}
    assert len(keys) == 2500


def _draws(probs: torch.Tensor, keys: list[tuple[int, int]]) -> torch.Tensor:
    ds = DeviceSampler(probs.shape[0], torch.device("cpu"))
    ints = torch.zeros(len(keys), 4, dtype=torch.int32)
    for i, (k1, k2) in enumerate(keys):
        ints[i, _KEY1], ints[i, _KEY2] = (int(torch.tensor(k, dtype=torch.int64).to(torch.int32)) for k in (k1, k2))
    ints[:, _GREEDY] = 0
    return (probs.log()[None, :] + ds._gumbel(ints)).argmax(-1)


@pytest.mark.parametrize("vary", ["seed", "step"])
def test_noise_draws_follow_the_distribution(vary):
    """Gumbel-max over the hash noise draws each token with its probability, across seeds and across the steps
    of one seed (a chi-square test; deterministic: the noise is a hash, the threshold is p = 0.001)."""
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.03, 0.01])
    n = 6000
    keys = [noise_keys(i, 0) if vary == "seed" else noise_keys(99, i) for i in range(n)]
    counts = torch.bincount(_draws(probs, keys), minlength=probs.numel()).double()
    chi2 = float(((counts - n * probs.double()) ** 2 / (n * probs.double())).sum())
    assert chi2 < 22.46, (chi2, counts.tolist())     # the 0.999 quantile of chi-square with 6 degrees of freedom
    # consecutive steps are not correlated: the pair (draw at step s, draw at s + 1) is independent
    draws = _draws(probs, [noise_keys(99, i) for i in range(n)])
    same = float((draws[1:] == draws[:-1]).double().mean())
    expected = float((probs ** 2).sum())
    assert abs(same - expected) < 4 * math.sqrt(expected * (1 - expected) / n)
