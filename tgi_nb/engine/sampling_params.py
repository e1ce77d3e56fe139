"""Per-request sampling parameters, validated before a request is queued."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Collection, Optional

import torch

# A logits processor sees the token ids generated so far for one sequence and its next-token
# logits (1-D float tensor over the vocabulary) and returns the logits to sample from.
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]
# Builds a fresh processor; called once per sample, so a stateful processor (a grammar matcher that
# advances with the sample's tokens) is never shared by the ``n`` samples of a request.
LogitsProcessorFactory = Callable[[], LogitsProcessor]

MAX_TOP_LOGPROBS = 20
# Checked at every generated token of every sample; a few are what clients send (end-of-turn ids).
MAX_STOP_TOKEN_IDS = 256
# What torch.Generator.manual_seed takes; sample i of a request is seeded with seed + i.
SEED_RANGE = (-2**63, 2**64 - 1)


class ValidationError(ValueError):
    """A request parameter is out of range. ``field`` names it, the message says what is allowed.

    Example:
        >>> try:
        ...     SamplingParams(temperature=-1)
        ... except ValidationError as e:
        ...     print(e.field)
        temperature
    """

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _check(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ValidationError(field, f"{field}: {message}")


@dataclass(slots=True)
class SamplingParams:
    """How one request samples and when it stops.

    ``temperature == 0`` (or ``do_sample=False``) means greedy decoding. ``frequency_penalty`` and
    ``presence_penalty`` have OpenAI's meaning (subtracted from the logits, proportional to the count /
    once per token already generated); ``repetition_penalty`` is the multiplicative CTRL penalty of
    transformers and TGI over prompt and generated tokens. ``logprobs=None`` returns none, ``0`` the
    chosen token's log-probability only, ``k`` also the top ``k`` alternatives; ``prompt_logprobs`` the
    same for every prompt token after the first (the prompt is then computed whole, never taken from the
    prefix cache). ``n`` samples share the
    prompt's KV blocks; with a ``seed`` sample ``i`` uses ``seed + i``. ``logits_processor`` is shared by
    every sample; ``logits_processor_factory`` is called once per sample for processors with state.

    Example:
        >>> p = SamplingParams(max_new_tokens=16, temperature=0.7, top_p=0.9, stop=["\\n\\n"], seed=1)
        >>> p.greedy
        False
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: Optional[dict[int, float]] = None
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: Collection[int] = field(default_factory=frozenset)
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    n: int = 1
    do_sample: bool = True
    logits_processor: Optional[LogitsProcessor] = None
    logits_processor_factory: Optional[LogitsProcessorFactory] = None

    def __post_init__(self) -> None:
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
               "max_new_tokens", f"must be an integer >= 1, got {self.max_new_tokens!r}")
        _check(math.isfinite(self.temperature) and self.temperature >= 0,
               "temperature", f"must be >= 0 (0 means greedy), got {self.temperature!r}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0,
               "top_k", f"must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        _check(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p!r}")
        _check(self.repetition_penalty > 0, "repetition_penalty",
               f"must be > 0 (1 disables it), got {self.repetition_penalty!r}")
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty",
               f"must be in [-2, 2], got {self.frequency_penalty!r}")
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty",
               f"must be in [-2, 2], got {self.presence_penalty!r}")
        if self.logit_bias:
            for token_id, bias in self.logit_bias.items():
                _check(isinstance(token_id, int) and token_id >= 0, "logit_bias",
                       f"keys must be token ids (integers >= 0), got {token_id!r}")
                _check(-100 <= bias <= 100, "logit_bias",
                       f"values must be in [-100, 100], got {bias!r} for token {token_id}")
        _check(isinstance(self.n, int) and 1 <= self.n <= 128, "n",
               f"must be an integer in [1, 128], got {self.n!r}")
        _check(self.seed is None or (isinstance(self.seed, int)
                                     and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1] - (self.n - 1)),
               "seed", f"must be an integer of at most 64 bits, in [{SEED_RANGE[0]}, {SEED_RANGE[1] - (self.n - 1)}], "
                       f"got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check(all(isinstance(s, str) and s for s in self.stop), "stop",
               "must be non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               "must be token ids (integers >= 0)")
        self.stop_token_ids = frozenset(self.stop_token_ids)   # looked up at every token
        _check(len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids",
               f"at most {MAX_STOP_TOKEN_IDS} token ids, got {len(self.stop_token_ids)}")
        _check(self.logprobs is None or (isinstance(self.logprobs, int)
                                         and 0 <= self.logprobs <= MAX_TOP_LOGPROBS),
               "logprobs", f"must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs!r}")
        _check(self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int)
                                                and 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS),
               "prompt_logprobs",
               f"must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.prompt_logprobs!r}")
        _check(self.logits_processor is None or self.logits_processor_factory is None,
               "logits_processor_factory", "cannot be set together with logits_processor")

    @property
    def greedy(self) -> bool:
        """True when the next token is always the most likely one."""
        return not self.do_sample or self.temperature == 0 or self.top_k == 1
