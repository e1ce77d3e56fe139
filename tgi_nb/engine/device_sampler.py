"""Sampling for the GPU path: every row of a step in a few batched operations on the device, one sync.

:func:`tgi_nb.engine.sampler.sample` works row by row on the host (right for the CPU path, where the logits
are already there); on a GPU that is a handful of launches and a synchronisation per sequence. Here the rows'
parameters go to the device in the step's one host->device copy (:class:`~tgi_nb.engine.step_inputs.HostBuffer`)
and every stage runs on the whole ``[rows, vocab]`` batch at once: penalties (scattered from each row's token
ids), logit bias, grammar bitmasks (llguidance writes each row's bits on the host; one unpack and mask on the
device), temperature, top-k, top-p and min-p (one sort, when a row asks for top-k or top-p), then Gumbel-max
sampling. Only custom logits processors without a bitmask run per row. The tokens, their log-probabilities and
the top alternatives come back in one device->host copy.

Seeds: the noise is counter-based, not drawn from a generator: a 32-bit hash of (the row's seed, how many
tokens it has generated, the token id), computed with integer tensor ops, so a seeded request's tokens never
depend on what else is in the batch (or on a preemption that recomputes it), and are the same on the CPU and on
any GPU given the same logits. It is not the CPU sampler's generator stream, so seeded samples differ from the
CPU path's token for token; their distribution is the same (tests/test_device_sampler.py).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .sampler import SampledToken
from .sequence import Sequence
from .step_inputs import DeviceViews, Field, HostBuffer

_M32 = 0xFFFFFFFF


def mix32(x):
    """A 32-bit integer hash (Wellons' lowbias32, a bijection with good avalanche) of Python ints or int64
    tensors holding values in ``[0, 2**32)``. Each product is split in 16-bit halves so that no intermediate
    leaves int64: the tensor and the integer versions agree bit for bit.

    Example:
        >>> mix32(12345) == int(mix32(torch.tensor([12345]))[0])
        True
    """
    def mul(v, c):   # (v * c) mod 2**32 without overflowing int64
        return (v * (c & 0xFFFF) + (((v * (c >> 16)) & 0xFFFF) << 16)) & _M32

    x = x ^ (x >> 16)
    x = mul(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul(x, 0x846CA68B)
    return x ^ (x >> 16)


def noise_keys(seed, step):
    """The two 32-bit keys of a row's noise at ``step`` (tokens generated so far) for ``seed`` (a 64-bit seed, as
    ``torch.Generator.initial_seed()`` gives it): Python ints, or numpy uint64 arrays of rows (the same values).

    Example:
        >>> noise_keys(7, 0) != noise_keys(7, 1) and noise_keys(7, 0) != noise_keys(8, 0)
        True
        >>> k1, k2 = noise_keys(np.array([7, 8], np.uint64), np.array([0, 3], np.uint64))
        >>> [int(k1[0]), int(k2[1])] == [noise_keys(7, 0)[0], noise_keys(8, 3)[1]]
        True
    """
    m32 = np.uint64(_M32) if isinstance(seed, np.ndarray) else _M32
    k1 = mix32((seed & m32) ^ mix32(seed >> 32))
    return k1, mix32((step & m32) ^ mix32((k1 + 0x9E3779B9) & m32))


# Columns of the per-row float32 parameters.
_TEMP, _TOP_P, _MIN_P, _REP, _FREQ, _PRES = range(6)
# Columns of the per-row int32 parameters.
_TOP_K, _KEY1, _KEY2, _GREEDY = range(4)


class SamplingBatch:
    """One step's sampling inputs, written into a :class:`HostBuffer` (possibly the step's own, to share its
    copy) by :meth:`DeviceSampler.prepare`."""

    __slots__ = ("seqs", "floats", "ints", "penalty_ids", "bias", "bitmask", "errors", "greedy", "sampled",
                 "max_logprobs", "custom_rows", "needs_sort", "needs_min_p", "needs_rep", "needs_counts")

    def __init__(self, seqs: list[Sequence]):
        self.seqs = seqs
        self.penalty_ids: Optional[Field] = None
        self.bias: Optional[Field] = None
        self.bitmask: Optional[Field] = None
        self.errors: dict[int, str] = {}


class DeviceSampler:
    """Samples a step's rows on ``device``; same contract and outputs as :func:`tgi_nb.engine.sampler.sample`.

    Example:
        >>> from tgi_nb.engine.sequence import Request
        >>> from tgi_nb.engine.sampling_params import SamplingParams
        >>> req = Request("r", [1, 2], SamplingParams(temperature=0, logprobs=1), lambda _: None, 0.0)
        >>> seq = Sequence(req, 0, [1, 2], None, None)
        >>> out = DeviceSampler(vocab_size=4, device=torch.device("cpu")).sample(
        ...     torch.tensor([[0.0, 3.0, 1.0, 0.5]]), [seq])
        >>> out[0].token_id, [t for t, _ in out[0].top]
        (1, [1])
    """

    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.buffer = HostBuffer(self.device)
        token_ids = torch.arange(vocab_size, dtype=torch.int64)
        self._token_hash = mix32(token_ids).to(self.device)     # the noise's per-token input, hashed once
        self._shifts = torch.arange(32, dtype=torch.int32, device=self.device)

    # ------------------------------------------------------------------------------------------ host side
    def prepare(self, seqs: list[Sequence], buffer: Optional[HostBuffer] = None) -> SamplingBatch:
        """Write the rows' parameters, penalty token ids, logit biases and grammar bitmasks into ``buffer``
        (this sampler's own when None; the caller then resets it). Grammar matchers advance here."""
        buf = buffer or self.buffer
        if buffer is None:
            buf.reset()
        batch = SamplingBatch(seqs)
        rows = len(seqs)
        params = [s.request.params for s in seqs]
        batch.greedy = [p.greedy for p in params]
        batch.sampled = not all(batch.greedy)
        batch.max_logprobs = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        batch.floats = buf.allocate((rows, 6), torch.float32)
        batch.ints = buf.allocate((rows, 4), torch.int32)
        rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        count_rows = [i for i, p in enumerate(params) if (p.frequency_penalty or p.presence_penalty)
                      and seqs[i].output_counts]
        batch.needs_rep, batch.needs_counts = bool(rep_rows), bool(count_rows)
        if rep_rows or count_rows:
            # per row: the ids the repetition penalty sees, then the generated ids and their counts (padded with
            # vocab_size, a column that is dropped)
            rep_ids = {i: np.unique(seqs[i].token_ids) for i in rep_rows}
            width = max([len(v) for v in rep_ids.values()] + [len(seqs[i].output_counts) for i in count_rows])
            batch.penalty_ids = buf.allocate((3, rows, width), torch.int32)
        bias = [(i, t, b) for i, p in enumerate(params) if p.logit_bias for t, b in p.logit_bias.items()
                if t < self.vocab_size]
        if bias:
            batch.bias = buf.allocate((3, len(bias)), torch.float32)
        grammar_rows = [i for i, s in enumerate(seqs) if hasattr(s.logits_processor, "fill_bitmask")]
        if grammar_rows:
            batch.bitmask = buf.allocate((rows, (self.vocab_size + 31) // 32), torch.int32)
        grammar = set(grammar_rows)
        batch.custom_rows = [i for i, s in enumerate(seqs) if s.logits_processor is not None and i not in grammar]

        # whole columns at once: a numpy assignment per row costs microseconds, and this runs every step
        # (top_p = 1 must keep every token: a float32 cumulative sum can reach 1 before the tail, hence inf)
        buf.host(batch.floats)[...] = [
            (1.0 if p.greedy else p.temperature, p.top_p if p.top_p < 1.0 else float("inf"), p.min_p,
             p.repetition_penalty, p.frequency_penalty, p.presence_penalty) for p in params]
        seeds = np.array([s.generator.initial_seed() if s.generator is not None else 0 for s in seqs], np.uint64)
        k1, k2 = noise_keys(seeds, np.array([s.num_output_tokens for s in seqs], np.uint64))
        ints = buf.host(batch.ints)
        ints[:, _TOP_K] = [p.top_k if 0 < p.top_k < self.vocab_size else self.vocab_size for p in params]
        ints[:, _KEY1] = k1.astype(np.uint32).view(np.int32)   # the keys' bit patterns
        ints[:, _KEY2] = k2.astype(np.uint32).view(np.int32)
        ints[:, _GREEDY] = batch.greedy
        batch.needs_sort = any(not g and (p.top_k or p.top_p < 1.0) for g, p in zip(batch.greedy, params))
        batch.needs_min_p = any(not g and p.min_p > 0 for g, p in zip(batch.greedy, params))
        if batch.penalty_ids is not None:
            ids = buf.host(batch.penalty_ids)
            ids[:2].fill(self.vocab_size)
            ids[2].fill(0)
            for i, values in rep_ids.items():
                ids[0, i, :len(values)] = values
            for i in count_rows:
                counts = seqs[i].output_counts
                ids[1, i, :len(counts)] = list(counts.keys())
                ids[2, i, :len(counts)] = list(counts.values())
        if bias:
            buf.host(batch.bias)[...] = np.array(bias, dtype=np.float32).T
        if grammar_rows:
            masks = buf.host(batch.bitmask)
            masks.fill(-1)
            for i in grammar_rows:
                try:
                    seqs[i].logits_processor.fill_bitmask(seqs[i].output_token_ids, torch.from_numpy(masks[i]))
                except Exception as exc:  # fails this request only
                    batch.errors[i] = f"{type(exc).__name__}: {exc}"
        return batch

    # ------------------------------------------------------------------------------------------ device side
    def sample(self, logits: torch.Tensor, seqs: list[Sequence], batch: Optional[SamplingBatch] = None,
               views: Optional[DeviceViews] = None) -> list[SampledToken]:
        """Pick the next token of each row of ``logits`` ([rows, vocab] float32, on the device) for ``seqs[row]``.

        Without ``batch`` the inputs are prepared and copied here; with it (prepared into the step's buffer),
        ``views`` are that buffer's device views.
        """
        if batch is None:
            batch = self.prepare(seqs)
            views = self.buffer.to_device()
        processed = self._process(logits, batch, views)
        tokens = processed.argmax(dim=-1)
        if batch.sampled:
            floats, ints = views[batch.floats].float(), views[batch.ints]
            scaled = self._truncate(processed / floats[:, _TEMP, None], batch, floats, ints)
            drawn = (scaled + self._gumbel(ints)).argmax(dim=-1)
            tokens = torch.where(ints[:, _GREEDY].bool(), tokens, drawn) if any(batch.greedy) else drawn
        columns = [tokens.to(torch.float64)[:, None]]
        if batch.max_logprobs is not None:
            raw = torch.log_softmax(logits.float(), dim=-1)   # of the model's distribution, as the CPU sampler
            columns.append(raw.gather(1, tokens[:, None]).double())
            if batch.max_logprobs:
                values, ids = raw.topk(batch.max_logprobs, dim=-1)
                columns += [values.double(), ids.double()]
        host = torch.cat(columns, dim=1).cpu().tolist()   # the step's one device->host synchronisation
        out = []
        for i, seq in enumerate(seqs):
            row = host[i]
            token = SampledToken(int(row[0]), error=batch.errors.get(i))
            k = seq.request.params.logprobs
            if k is not None:
                token.logprob = row[1]
                m = batch.max_logprobs
                token.top = [(int(t), v) for v, t in zip(row[2:2 + k], row[2 + m:2 + m + k])]
            out.append(token)
        return out

    def _process(self, logits: torch.Tensor, batch: SamplingBatch, views: DeviceViews) -> torch.Tensor:
        """Penalties, logit bias and grammar masks, batched; custom processors row by row."""
        if not (batch.needs_rep or batch.needs_counts or batch.bias or batch.bitmask or batch.custom_rows):
            return logits
        out = logits.clone()
        rows, vocab = out.shape
        floats = views[batch.floats]
        if batch.penalty_ids is not None:
            ids = views[batch.penalty_ids].long()
            if batch.needs_rep:   # transformers/TGI: divide positive logits, multiply negative ones
                seen = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=out.device)
                seen.scatter_(1, ids[0], True)
                penalty = floats[:, _REP, None]
                out = torch.where(seen[:, :vocab], torch.where(out < 0, out * penalty, out / penalty), out)
            if batch.needs_counts:   # OpenAI: frequency scales with the count, presence once
                counts = torch.zeros(rows, vocab + 1, dtype=out.dtype, device=out.device)
                counts.scatter_add_(1, ids[1], ids[2].to(out.dtype))
                counts = counts[:, :vocab]
                out = out - counts * floats[:, _FREQ, None] - (counts > 0).to(out.dtype) * floats[:, _PRES, None]
        if batch.bias is not None:
            bias = views[batch.bias]
            out.index_put_((bias[0].long(), bias[1].long()), bias[2], accumulate=True)
        if batch.bitmask is not None:
            bits = views[batch.bitmask]
            allowed = ((bits[:, :, None] >> self._shifts) & 1).view(rows, -1)[:, :vocab].bool()
            out.masked_fill_(~allowed, float("-inf"))
        for i in batch.custom_rows:
            seq = batch.seqs[i]
            try:
                out[i] = seq.logits_processor(seq.output_token_ids, out[i])
            except Exception as exc:  # fails this request only
                batch.errors[i] = f"{type(exc).__name__}: {exc}"
        return out

    @staticmethod
    def _truncate(scaled: torch.Tensor, batch: SamplingBatch, floats: torch.Tensor, ints: torch.Tensor
                  ) -> torch.Tensor:
        """Top-k, top-p and min-p of every row at once, with the CPU sampler's semantics (ties at the k-th value
        kept; a token kept while the mass before it is below top_p; min-p relative to the most likely token)."""
        if batch.needs_sort:
            ordered, order = scaled.sort(dim=-1, descending=True)
            kth = ordered.gather(1, (ints[:, _TOP_K, None] - 1).long())
            ordered = ordered.masked_fill(ordered < kth, float("-inf"))
            probs = ordered.softmax(-1)
            drop = (probs.cumsum(-1) - probs) >= floats[:, _TOP_P, None]
            drop |= ordered == float("-inf")
            scaled = scaled.masked_fill(torch.zeros_like(drop).scatter_(1, order, drop), float("-inf"))
        if batch.needs_min_p:
            probs = scaled.softmax(-1)
            scaled = scaled.masked_fill(probs < floats[:, _MIN_P, None] * probs.max(-1, keepdim=True).values,
                                        float("-inf"))
        return scaled

    def _gumbel(self, ints: torch.Tensor) -> torch.Tensor:
        """Gumbel noise ``-log(-log(u))`` from the counter-based hash: 24 bits of ``u`` per (row, token)."""
        keys = ints[:, _KEY1:_KEY2 + 1].long() & _M32   # a slice: a list index would be a host->device copy
        x = mix32(self._token_hash[None, :] ^ keys[:, :1])
        x = mix32((x + keys[:, 1:]) & _M32)
        u = ((x >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
        return -torch.log(-torch.log(u))
