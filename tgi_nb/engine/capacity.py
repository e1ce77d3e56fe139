"""Every limit, decided once: the capacity planner and the rules that relate the limits to each other.

Every limit that bounds a request or the KV cache (``max_input_tokens``, ``max_total_tokens``,
``max_batch_prefill_tokens``, ``max_batch_total_tokens``, the KV cache's bytes) is decided by
:func:`plan_capacity`, a pure function of the model's shape, the limits asked for and the memory the
cache may take (:mod:`tgi_nb.engine.budget` reads that memory). ``tgi-nb serve`` and notebook endpoints both
reach it through :class:`~tgi_nb.engine.LLMEngine`, so they agree, and its ``reasons`` are what the log,
``/info`` readers and the endpoint's warnings show.

The rules the limits obey are written here once and used by every layer that checks them:
:func:`limit_conflict` (``max_input_tokens < max_total_tokens`` and the batch limits; the engine's config, the
server's settings and ``tgi-nb serve`` refuse what it names) and :class:`RequestLimits` (a prompt and its new
tokens within the context; the engine and every route check requests with it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .sampling_params import ValidationError

# The default KV cache holds this many tokens per sequence that may run at once: a chat turn (system prompt,
# question, answer) is a few hundred tokens; a longer request still fits, since the cache always holds at
# least one max_total_tokens request.
TYPICAL_SEQUENCE_TOKENS = 512
# Share of the memory headroom the KV cache may take by default; the rest is for activations, the Python heap,
# the HTTP server and the kernel around it.
KV_HEADROOM_SHARE = 0.7
# On CUDA the cache takes this share of the free device memory, the rest is for activations.
KV_CUDA_FREE_SHARE = 0.8


class CapacityError(ValidationError):
    """The limits asked for cannot work in the memory there is; the message names the field and the numbers."""


# ----------------------------------------------------------------------------------------------------------
# The capacity planner
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ModelShape:
    """What sizes a model's KV cache: layers, kv heads and head size, and its context in tokens.

    Example:
        >>> ModelShape(num_layers=30, num_kv_heads=3, head_dim=64, context=8192).kv_bytes_per_token(4)
        46080
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    context: int

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True, slots=True)
class CapacityRequest:
    """The limits asked for (None: choose), named as text-generation-launcher names them.

    ``kv_cache_memory`` and ``max_batch_total_tokens`` set the cache exactly (the latter lowered only when it
    does not fit the memory budget); ``max_concurrent_requests`` and ``max_num_seqs`` size the default cache.
    """

    max_input_tokens: Optional[int] = None
    max_total_tokens: Optional[int] = None
    max_batch_prefill_tokens: int = 512
    max_batch_total_tokens: Optional[int] = None
    kv_cache_memory: Optional[int] = None
    max_num_seqs: int = 64
    max_concurrent_requests: Optional[int] = None
    block_size: int = 16
    kv_dtype_bytes: int = 4


@dataclass(frozen=True, slots=True)
class Lowering:
    """One limit the planner set below what was asked: the field, both values and why.

    Example:
        >>> Lowering("max_total_tokens", 32000, 2048, "more than the model's context (2048 tokens)").message()
        "max_total_tokens=32000 is more than the model's context (2048 tokens): lowered to 2048."
        >>> Lowering("max_total_tokens", 32000, 2048, "too long").message("MAX_TOTAL_TOKENS")
        'MAX_TOTAL_TOKENS=32000 is too long: lowered to 2048.'
    """

    field: str
    requested: int
    used: int
    why: str

    def message(self, name: Optional[str] = None) -> str:
        """The sentence a log line or an endpoint warning shows, naming the option as the user wrote it."""
        return f"{name or self.field}={self.requested} is {self.why}: lowered to {self.used}."


@dataclass(frozen=True, slots=True)
class CapacityPlan:
    """The limits the engine uses, the KV cache they take, and why anything is below what was asked.

    ``sizing`` says how the KV cache size was chosen; ``lowerings`` lists each limit set below the request.

    Example:
        >>> plan = plan_capacity(ModelShape(30, 3, 64, 8192), CapacityRequest(), kv_budget=1 << 30)
        >>> plan.max_total_tokens, plan.max_batch_total_tokens, plan.kv_cache_bytes // 2**20
        (8192, 23296, 1023)
    """

    max_input_tokens: int
    max_total_tokens: int
    max_batch_prefill_tokens: int
    max_batch_total_tokens: int
    num_blocks: int
    block_size: int
    kv_bytes_per_token: int
    kv_budget: Optional[int]
    sizing: str
    lowerings: tuple[Lowering, ...] = field(default_factory=tuple)

    @property
    def kv_cache_bytes(self) -> int:
        return self.max_batch_total_tokens * self.kv_bytes_per_token

    def reasons(self) -> list[str]:
        """Every lowering as a sentence, then how the cache was sized.

        Example:
            >>> plan_capacity(ModelShape(2, 1, 8, 64), CapacityRequest(max_total_tokens=100), None).reasons()[0]
            "max_total_tokens=100 is more than the model's context (64 tokens): lowered to 64."
        """
        return [lowering.message() for lowering in self.lowerings] + [self.sizing]


def kv_budget_bytes(headroom: Optional[int], device: str = "cpu", cuda_memory_fraction: float = 1.0
                    ) -> Optional[int]:
    """The bytes a KV cache may take by default: ``KV_HEADROOM_SHARE`` of the memory headroom on the CPU;
    on CUDA ``KV_CUDA_FREE_SHARE`` of what this process may still take: the device's free memory, within
    ``cuda_memory_fraction`` of its total less what torch already holds here (the weights). None when the
    headroom is unknown.

    Example:
        >>> kv_budget_bytes(10 << 30) / 2**30
        7.0
    """
    if str(device).startswith("cuda"):
        import torch

        dev = torch.device(device)
        free, total = torch.cuda.mem_get_info(dev)
        allowed = min(free, int(total * cuda_memory_fraction) - torch.cuda.memory_reserved(dev))
        return max(0, int(allowed * KV_CUDA_FREE_SHARE))
    return None if headroom is None else int(headroom * KV_HEADROOM_SHARE)


def plan_capacity(model: ModelShape, requested: CapacityRequest, kv_budget: Optional[int]) -> CapacityPlan:
    """Decide every limit from the model, what was asked and the bytes the KV cache may take (``kv_budget``;
    None: no limit known). Pure: the same inputs always give the same plan.

    - ``max_total_tokens``: as asked, lowered to the model's context; by default the context. Lowered further
      when the memory cannot hold one such request.
    - KV cache: ``kv_cache_memory`` bytes exactly; else ``max_batch_total_tokens`` exactly unless it exceeds
      ``kv_budget``; else enough for ``min(max_num_seqs, max_concurrent_requests)`` sequences of
      ``TYPICAL_SEQUENCE_TOKENS`` and at least one ``max_total_tokens`` request, within ``kv_budget``.
    - ``max_input_tokens``: as asked, lowered below ``max_total_tokens``; by default ``max_total_tokens - 1``.
    - ``max_batch_prefill_tokens``: as asked, lowered to the cache's size.

    Raises :class:`CapacityError` when explicit limits contradict each other or the memory cannot hold even a
    short request.

    Example:
        >>> smollm2 = ModelShape(num_layers=30, num_kv_heads=3, head_dim=64, context=8192)
        >>> plan = plan_capacity(smollm2, CapacityRequest(max_total_tokens=4096), kv_budget=2 << 30)
        >>> plan.max_total_tokens, plan.max_input_tokens, plan.max_batch_total_tokens
        (4096, 4095, 32768)
        >>> small = plan_capacity(smollm2, CapacityRequest(max_batch_total_tokens=100_000), kv_budget=256 << 20)
        >>> small.max_batch_total_tokens, small.max_total_tokens
        (5824, 5824)
        >>> [x.field for x in small.lowerings]
        ['max_batch_total_tokens', 'max_total_tokens']
    """
    r = requested
    bs = r.block_size
    per_token = model.kv_bytes_per_token(r.kv_dtype_bytes)
    lowerings: list[Lowering] = []
    gib = 2 ** 30

    def lower(name: str, asked: int, used: int, why: str) -> int:
        lowerings.append(Lowering(name, asked, used, why))
        return used

    max_total = r.max_total_tokens
    if max_total is not None and max_total > model.context:
        max_total = lower("max_total_tokens", max_total, model.context,
                          f"more than the model's context ({model.context} tokens)")
    max_total = max_total or model.context
    budget_tokens = None if kv_budget is None else kv_budget // per_token // bs * bs

    if r.kv_cache_memory is not None:
        capacity = r.kv_cache_memory // per_token // bs * bs
        sizing = (f"KV cache: kv_cache_memory={r.kv_cache_memory} bytes as configured, {capacity} tokens at "
                  f"{per_token} bytes per token")
    elif r.max_batch_total_tokens is not None:
        capacity = r.max_batch_total_tokens
        if budget_tokens is not None and capacity > budget_tokens:
            capacity = lower("max_batch_total_tokens", capacity, budget_tokens,
                             f"a KV cache of {r.max_batch_total_tokens * per_token / gib:.2f} GiB, more than the "
                             f"{kv_budget / gib:.2f} GiB the memory budget gives it")
            sizing = f"KV cache: {capacity} tokens, all the memory budget gives it"
        else:
            sizing = f"KV cache: max_batch_total_tokens={capacity} as configured"
    else:
        seqs = min(r.max_num_seqs, r.max_concurrent_requests or r.max_num_seqs)
        typical = min(max_total, TYPICAL_SEQUENCE_TOKENS)
        wanted = -(-max(max_total, seqs * typical) // bs) * bs
        capacity = wanted if budget_tokens is None else min(wanted, budget_tokens)
        sizing = (f"KV cache sized for the work: {seqs} sequences of {typical} tokens, and one of "
                  f"max_total_tokens={max_total}: {wanted} tokens")
        if capacity < wanted:
            sizing += f", lowered to {capacity} tokens, all the memory budget ({kv_budget / gib:.2f} GiB) holds"
    capacity = capacity // bs * bs
    if capacity < bs:
        raise CapacityError(
            "max_batch_total_tokens",
            f"max_batch_total_tokens: the memory budget ({(kv_budget or 0) / 2**20:.0f} MiB for the KV cache) "
            f"cannot hold one block of {bs} tokens at {per_token} bytes per token; free memory or raise the "
            f"container's limit")

    explicit_capacity = r.kv_cache_memory is not None or (
        r.max_batch_total_tokens is not None and not any(x.field == "max_batch_total_tokens" for x in lowerings))
    if max_total > capacity:
        if explicit_capacity and r.max_total_tokens is not None:
            name = "kv_cache_memory" if r.kv_cache_memory is not None else "max_batch_total_tokens"
            raise CapacityError("max_total_tokens", f"max_total_tokens ({max_total}) exceeds the KV cache capacity "
                                                    f"{name} ({capacity} tokens)")
        why = ("more than the KV cache holds" if explicit_capacity
               else f"more than the KV cache the memory budget allows holds ({capacity} tokens)")
        max_total = lower("max_total_tokens", r.max_total_tokens or max_total, capacity, why)

    max_input = r.max_input_tokens
    if max_input is not None and limit_conflict(max_input_tokens=max_input, max_total_tokens=max_total):
        max_input = lower("max_input_tokens", max_input, max_total - 1,
                          f"not below max_total_tokens ({max_total})")
    max_input = max_input or max_total - 1
    if max_input < 1:
        raise CapacityError("max_total_tokens", f"max_total_tokens ({max_total}) must be >= 2")

    prefill = r.max_batch_prefill_tokens
    if prefill > capacity:
        prefill = lower("max_batch_prefill_tokens", prefill, capacity, f"more than the KV cache ({capacity} tokens)")
    # The cache is mapped, not written (model_runner.allocate_kv_caches): the figure is a ceiling, not memory taken.
    sizing += f"; up to {capacity * per_token / gib:.2f} GiB of memory, taken only as requests fill it"
    return CapacityPlan(max_input_tokens=max_input, max_total_tokens=max_total, max_batch_prefill_tokens=prefill,
                        max_batch_total_tokens=capacity, num_blocks=capacity // bs, block_size=bs,
                        kv_bytes_per_token=per_token, kv_budget=kv_budget, sizing=sizing,
                        lowerings=tuple(lowerings))


# ----------------------------------------------------------------------------------------------------------
# The rules between limits, and one request within them
# ----------------------------------------------------------------------------------------------------------

# (limit, the limit it must stay below, whether equal is allowed), in the order they are checked
_LIMIT_ORDER = (
    ("max_input_tokens", "max_total_tokens", False),
    ("max_total_tokens", "max_batch_total_tokens", True),
    ("max_batch_prefill_tokens", "max_batch_total_tokens", True),
)


def limit_conflict(**limits: Optional[int]) -> Optional[tuple[str, str]]:
    """The first two of ``limits`` that contradict each other, as (field, message), else None: a prompt must be
    shorter than a request's total, a request and a step's prefill must fit the KV cache. Limits not given (or
    None) are not checked; each caller raises the message as its own error.

    Example:
        >>> limit_conflict(max_input_tokens=4096, max_total_tokens=2048)
        ('max_input_tokens', 'max_input_tokens (4096) must be < max_total_tokens (2048)')
        >>> limit_conflict(max_total_tokens=4096, max_batch_total_tokens=4096, max_input_tokens=None) is None
        True
    """
    for small, large, equal_ok in _LIMIT_ORDER:
        a, b = limits.get(small), limits.get(large)
        if a is not None and b is not None and (a > b if equal_ok else a >= b):
            return small, f"{small} ({a}) must be {'<=' if equal_ok else '<'} {large} ({b})"
    return None


class ContextLengthError(ValidationError):
    """A prompt longer than ``max_input_tokens``, or a prompt and its new tokens longer than ``max_total_tokens``.

    ``limit`` names the limit passed and ``value`` its size; ``prompt_tokens`` and ``max_new_tokens`` are what
    was asked, so that each layer words the error its own way (the OpenAI routes as OpenAI does). ``field`` is
    the engine's: ``prompt`` or ``max_new_tokens``.
    """

    def __init__(self, limit: str, value: int, prompt_tokens: int, max_new_tokens: Optional[int]):
        self.limit, self.value = limit, value
        self.prompt_tokens, self.max_new_tokens = prompt_tokens, max_new_tokens
        if limit == "max_input_tokens":
            super().__init__("prompt", f"prompt: {prompt_tokens} tokens is more than max_input_tokens ({value})")
        else:
            super().__init__("max_new_tokens", f"max_new_tokens: prompt ({prompt_tokens} tokens) + max_new_tokens "
                                               f"({max_new_tokens}) must be <= max_total_tokens ({value})")


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """The two limits one request is checked against: its prompt, and its prompt with the new tokens.

    Example:
        >>> limits = RequestLimits(max_input_tokens=1024, max_total_tokens=2048)
        >>> limits.max_new_tokens(100), limits.max_new_tokens(100, 500)
        (1948, 500)
        >>> limits.max_new_tokens(100, 2000)
        Traceback (most recent call last):
        ...
        tgi_nb.engine.capacity.ContextLengthError: max_new_tokens: prompt (100 tokens) + max_new_tokens (2000) must be <= max_total_tokens (2048)
        >>> limits.within(max_total_tokens=512)
        RequestLimits(max_input_tokens=511, max_total_tokens=512)
    """

    max_input_tokens: int
    max_total_tokens: int

    def within(self, max_input_tokens: Optional[int] = None, max_total_tokens: Optional[int] = None
               ) -> "RequestLimits":
        """These limits, lowered to the stricter ones given (a server's settings); the prompt stays below the
        total."""
        total = min(self.max_total_tokens, max_total_tokens or self.max_total_tokens)
        prompt = min(self.max_input_tokens, max_input_tokens or self.max_input_tokens)
        return RequestLimits(min(prompt, total - 1), total)

    def max_new_tokens(self, prompt_tokens: int, requested: Optional[int] = None) -> int:
        """``requested`` new tokens after a prompt of ``prompt_tokens``, or (None) all the context has left.
        Raises :class:`ContextLengthError` when the prompt or the total is too long."""
        if prompt_tokens > self.max_input_tokens:
            raise ContextLengthError("max_input_tokens", self.max_input_tokens, prompt_tokens, requested)
        if requested is None:
            return self.max_total_tokens - prompt_tokens
        if prompt_tokens + requested > self.max_total_tokens:
            raise ContextLengthError("max_total_tokens", self.max_total_tokens, prompt_tokens, requested)
        return requested
