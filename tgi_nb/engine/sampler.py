"""Turning one step's logits into next tokens, each row by its own request's parameters.

Every operation is row-wise, and each sampled row draws from its own ``torch.Generator``, so a seeded
request gets the same tokens whatever else shares the batch. Log-probabilities are those of the
model's raw distribution (before penalties, temperature or truncation), as vLLM and TGI report them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .sequence import Sequence


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: Optional[float] = None
    top: Optional[list[tuple[int, float]]] = None
    error: Optional[str] = None   # this row's processing raised (e.g. its logits processor)


def _needs_processing(seq: Sequence) -> bool:
    p = seq.request.params
    return bool(p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty or p.logit_bias
                or seq.logits_processor is not None)


def _apply_penalties(row: torch.Tensor, seq: Sequence) -> torch.Tensor:
    p = seq.request.params
    if p.repetition_penalty != 1.0:
        # transformers/TGI semantics: over prompt and generated tokens, divide positive logits and
        # multiply negative ones by the penalty.
        ids = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long)
        scores = row[ids]
        row[ids] = torch.where(scores < 0, scores * p.repetition_penalty, scores / p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and seq.output_counts:
        # OpenAI semantics: only generated tokens; frequency scales with the count, presence once.
        ids = torch.tensor(list(seq.output_counts.keys()), dtype=torch.long)
        counts = torch.tensor(list(seq.output_counts.values()), dtype=row.dtype)
        row[ids] -= counts * p.frequency_penalty + (counts > 0).to(row.dtype) * p.presence_penalty
    if seq.request.logit_bias is not None:
        ids, biases = seq.request.logit_bias
        inside = ids < row.shape[0]     # ids past a model's (smaller) output vocabulary are left out
        row[ids[inside]] += biases[inside].to(row.dtype)
    if seq.logits_processor is not None:
        row = seq.logits_processor(seq.output_token_ids, row)
    return row


def _truncate(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside top-k, the top-p nucleus and the min-p floor of one row."""
    if top_k and top_k < logits.shape[0]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Keep a token while the mass before it is below top_p (so the first is always kept).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[SampledToken]:
    """Pick the next token for each row of ``logits`` ([rows, vocab], float32) for ``seqs[row]``.

    Example:
        >>> sample(torch.tensor([[0.0, 3.0, 1.0]]), [seq])[0].token_id   # doctest: +SKIP
        1
    """
    out = [SampledToken(0) for _ in seqs]
    want_logprobs = [i for i, s in enumerate(seqs) if s.request.params.logprobs is not None]
    raw_logprobs = torch.log_softmax(logits[want_logprobs], dim=-1) if want_logprobs else None

    processed = logits
    if any(_needs_processing(s) for s in seqs):
        processed = logits.clone()
        for i, seq in enumerate(seqs):
            if _needs_processing(seq):
                try:
                    processed[i] = _apply_penalties(processed[i], seq)
                except Exception as exc:  # fails this request only
                    out[i].error = f"{type(exc).__name__}: {exc}"

    greedy_rows = [i for i, s in enumerate(seqs) if s.request.params.greedy]
    if greedy_rows:
        tokens = processed[greedy_rows].argmax(dim=-1).tolist()
        for i, t in zip(greedy_rows, tokens):
            out[i].token_id = t
    for i, seq in enumerate(seqs):
        p = seq.request.params
        if p.greedy:
            continue
        row = _truncate(processed[i] / p.temperature, p.top_k, p.top_p, p.min_p)
        probs = row.softmax(-1)
        # Exponential race (Gumbel-max in disguise): argmax(p / E) with E ~ Exp(1) draws from p,
        # using one draw from this sequence's own generator per step.
        noise = torch.empty_like(probs).exponential_(generator=seq.generator)
        out[i].token_id = int((probs / noise).argmax())

    for j, i in enumerate(want_logprobs):
        row = raw_logprobs[j]
        out[i].logprob = float(row[out[i].token_id])
        k = seqs[i].request.params.logprobs
        if k:
            values, ids = torch.topk(row, k)
            out[i].top = list(zip(ids.tolist(), values.tolist()))
        else:
            out[i].top = []
    return out
