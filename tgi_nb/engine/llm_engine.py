"""The engine: a loop thread that schedules, runs and updates, and thread-safe ways in and out.

Loading is the loader's (:mod:`~tgi_nb.engine.model_loader`), the forward pass and sampling the runner's, the
queues and what each sampled token means the scheduler's; :class:`LLMEngine` wires them. Requests enter through a thread-safe inbox; the loop thread owns every scheduler, block manager and
model structure, so nothing else ever touches them. Outputs leave through a per-request callback:
``generate`` (async) hands them to the caller's event loop with ``call_soon_threadsafe``, ``stream``
(blocking) through a ``queue.Queue``. No event loop ever waits on a forward pass.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import random
import threading
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator, Optional, Sequence as Seq

import torch

from .block_manager import BlockManager
from .budget import MemoryBudget, read_memory_budget, release_kv_bytes, reserve_kv_bytes
from .capacity import (CapacityError, CapacityPlan, CapacityRequest, ModelShape, RequestLimits, kv_budget_bytes,
                       plan_capacity)
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer, TokenTexts
from .model_loader import LoadedModel, load_model
from .model_runner import ModelRunner
from .outputs import OUT_OF_MEMORY, GenerationResult, RequestOutput, ResultAccumulator
from .sampling_params import SamplingParams, ValidationError
from .scheduler import Scheduler
from .sequence import Request, Sequence, SequenceStatus

logger = logging.getLogger("tgi_nb")


@dataclass(slots=True)
class EngineStats:
    """A snapshot of the engine's state and counters, readable from any thread."""

    num_requests: int
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_free: int
    block_size: int
    prompt_tokens_total: int
    generated_tokens_total: int
    prefix_cache_hit_tokens: int
    num_preemptions: int
    num_steps: int
    last_batch_size: int


def _is_out_of_memory(exc: BaseException) -> bool:
    # Python's MemoryError, torch's CUDA OutOfMemoryError, and the RuntimeError of torch's CPU allocator
    return isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))) or \
        "not enough memory" in str(exc)


def _plan(loaded: LoadedModel, config: EngineConfig) -> tuple[Optional[MemoryBudget], CapacityPlan]:
    """The memory budget (CPU) and the capacity plan, logged with why anything was lowered. Planned once the
    weights are loaded, so that the memory they take is already out of the headroom."""
    budget = read_memory_budget() if loaded.device.type == "cpu" else None
    spec = loaded.model.spec
    kv_budget = None if config.kv_cache_memory else kv_budget_bytes(
        budget.headroom if budget else None, str(loaded.device), config.cuda_memory_fraction)
    try:
        plan = plan_capacity(
            ModelShape(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.max_position_embeddings),
            CapacityRequest(max_input_tokens=config.max_input_tokens, max_total_tokens=config.max_total_tokens,
                            max_batch_prefill_tokens=config.max_batch_prefill_tokens,
                            max_batch_total_tokens=config.max_batch_total_tokens,
                            kv_cache_memory=config.kv_cache_memory, max_num_seqs=config.max_num_seqs,
                            max_concurrent_requests=config.max_concurrent_requests, block_size=config.block_size,
                            kv_dtype_bytes=loaded.kv_dtype.itemsize),
            kv_budget)
    except CapacityError as exc:
        if loaded.device.type != "cuda" or config.kv_cache_memory:
            raise
        # on a GPU the budget is what cuda_memory_fraction leaves after the weights: name the option
        free, total = torch.cuda.mem_get_info(loaded.device)
        fraction, gib = config.cuda_memory_fraction, 2**30
        raise CapacityError("cuda_memory_fraction", (
            f"cuda_memory_fraction: {exc}. The GPU has {total / gib:.1f} GiB ({free / gib:.1f} GiB free); "
            f"cuda_memory_fraction={fraction} allows {fraction * total / gib:.1f} GiB, of which the weights take "
            f"{loaded.weights_bytes / gib:.1f} GiB: raise --cuda-memory-fraction (CUDA_MEMORY_FRACTION), free GPU "
            f"memory, or lower the limits")) from None
    for lowering in plan.lowerings:
        # marked, so that an endpoint, which says each lowering in its own words, can leave this record out
        logger.warning("%s", lowering.message(), extra={"capacity_lowering": True})
    if budget is not None:
        logger.info("%s", budget.describe())
    logger.info("%s", plan.sizing)
    if loaded.threads is not None:
        logger.info("%s", loaded.threads.reason)
    return budget, plan


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


class LLMEngine:
    """Continuous-batching generation over a paged KV cache, in a thread of its own.

    It wires the parts and owns the thread: the loader (:func:`~tgi_nb.engine.model_loader.load_model`), the
    capacity plan, the runner (model, device, KV cache) and the scheduler (requests, queues, finishing). Each
    step reads schedule -> run -> update.

    Example:
        >>> from tgi_nb.engine import LLMEngine, EngineConfig, SamplingParams
        >>> engine = LLMEngine(EngineConfig())          # the bundled SmolLM2-135M-Instruct  # doctest: +SKIP
        >>> prompt = engine.tokenizer.apply_chat_template(
        ...     [{"role": "user", "content": "What is the capital of France?"}],
        ...     tokenize=False, add_generation_prompt=True)                               # doctest: +SKIP
        >>> engine.generate_sync(prompt, SamplingParams(max_new_tokens=20, temperature=0)).outputs[0].text  # doctest: +SKIP
        'The capital of France is Paris.'
        >>> engine.shutdown()                                                             # doctest: +SKIP
    """

    def __init__(self, config: Optional[EngineConfig] = None, **overrides):
        config = dataclasses.replace(config or EngineConfig(), **overrides)
        loaded = load_model(config)
        self.model_id, self.model_dir, self.tokenizer = loaded.model_id, loaded.model_dir, loaded.tokenizer
        self.model = loaded.model
        self.eos_token_ids = loaded.eos_token_ids
        self.vocab_size = self.model.spec.vocab_size
        self.weights_bytes = loaded.weights_bytes
        self.memory_budget, self.capacity = _plan(loaded, config)
        plan = self.capacity
        self.limits = RequestLimits(plan.max_input_tokens, plan.max_total_tokens)
        self.max_total_tokens = plan.max_total_tokens
        self.max_input_tokens = plan.max_input_tokens
        self.config = dataclasses.replace(config, max_total_tokens=plan.max_total_tokens,
                                          max_input_tokens=plan.max_input_tokens,
                                          max_batch_prefill_tokens=plan.max_batch_prefill_tokens,
                                          max_batch_total_tokens=plan.max_batch_total_tokens,
                                          dtype=_dtype_name(loaded.dtype), kv_cache_dtype=_dtype_name(loaded.kv_dtype),
                                          device=loaded.device.type, num_threads=torch.get_num_threads())

        self.block_manager = BlockManager(plan.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, plan.max_batch_prefill_tokens,
                                   self.eos_token_ids, TokenTexts(self.tokenizer))
        self.runner = ModelRunner(self.model, plan.num_blocks, config.block_size, loaded.kv_dtype,
                                  max_num_seqs=config.max_num_seqs, max_model_len=plan.max_total_tokens,
                                  enforce_eager=config.enforce_eager)
        reserve_kv_bytes(self, plan.kv_cache_bytes)
        logger.info("engine ready: %s (%s) on %s %s, weights %.0f MiB (%s), %d KV blocks x %d tokens (%.0f MiB %s, "
                    "resident as used), threads=%d, %.1fs",
                    self.model_id, loaded.source, loaded.device, loaded.dtype, self.weights_bytes / 2**20,
                    loaded.weight_formats(config.numerics), plan.num_blocks, config.block_size,
                    plan.kv_cache_bytes / 2**20, _dtype_name(loaded.kv_dtype), torch.get_num_threads(),
                    time.perf_counter() - loaded.started)

        self._inbox: queue.Queue = queue.Queue()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="tgi_nb-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ ways in
    def tokenize(self, prompt: str | list[int], add_special_tokens: bool = False) -> list[int]:
        """Token ids of a prompt; token id lists are checked against the vocabulary."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        ids = list(prompt)
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValidationError("prompt", f"prompt: token ids must be integers in [0, {self.vocab_size}), "
                                            f"got {bad[0]!r}")
        return ids

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: Optional[str] = None,
                    on_output: Optional[Callable[[RequestOutput], None]] = None,
                    add_special_tokens: bool = False, priority: int = 0) -> str:
        """Validate and queue a request; ``on_output`` is called from the engine thread with each
        ``RequestOutput``. Raises ``ValidationError`` (naming the field) before anything is queued.
        ``priority``: smaller is scheduled first (the server's Batch API lines use 1, interactive requests 0);
        equal priorities go in arrival order."""
        if self._stopped:
            raise RuntimeError("the engine has been shut down")
        token_ids = self.tokenize(prompt, add_special_tokens)
        if not token_ids:
            raise ValidationError("prompt", "prompt: must contain at least one token")
        self.limits.max_new_tokens(len(token_ids), params.max_new_tokens)   # raises ContextLengthError
        blocks = self._blocks_needed_alone(len(token_ids), params)
        if blocks > self.block_manager.num_blocks:
            bs = self.block_manager.block_size
            raise ValidationError(
                "n", f"n: {params.n} samples of up to {len(token_ids) + params.max_new_tokens} tokens need "
                     f"{blocks * bs} tokens of KV cache, more than its max_batch_total_tokens "
                     f"({self.block_manager.num_blocks * bs}); ask for fewer samples or fewer max_new_tokens")
        request_id = request_id or uuid.uuid4().hex
        request = Request(request_id, token_ids, params, on_output or (lambda _: None), time.monotonic(), priority)
        for index in range(params.n):
            generator = None
            if not params.greedy:
                generator = torch.Generator()
                seed = params.seed + index if params.seed is not None else random.getrandbits(63)
                generator.manual_seed(seed)
            detok = IncrementalDetokenizer(self.tokenizer, token_ids, params.stop)
            seq = Sequence(request, index, list(token_ids), detok, generator)
            if index:
                seq.status = SequenceStatus.FORK_PENDING
            request.seqs.append(seq)
        self._inbox.put(("add", request))
        return request_id

    def _blocks_needed_alone(self, prompt_len: int, params: SamplingParams) -> int:
        """KV blocks a request needs with nothing else running: the prompt's full blocks shared by its ``n``
        samples, the rest of each sample's blocks its own. More than the cache holds could never run."""
        bs = self.block_manager.block_size
        shared = prompt_len // bs
        return shared + params.n * (-(-(prompt_len + params.max_new_tokens) // bs) - shared)

    def abort(self, request_id: str) -> None:
        """Stop a request; its KV blocks are freed before the next step."""
        self._inbox.put(("abort", request_id))

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: Optional[str] = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs into the running event loop. Cancelling the consumer (or
        closing the iterator early) aborts the request.

        Example:
            >>> async for out in engine.generate("Once upon a time", SamplingParams(max_new_tokens=8)):  # doctest: +SKIP
            ...     print(out.outputs[0].text, end="")
        """
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        request_id = self.add_request(prompt, params, request_id,
                                      lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out))
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    def stream(self, prompt: str | list[int], params: SamplingParams,
               request_id: Optional[str] = None) -> Iterator[RequestOutput]:
        """Blocking iterator over a request's outputs (for scripts and the CLI).

        Example:
            >>> for out in engine.stream("Once upon a time", SamplingParams(max_new_tokens=8)):  # doctest: +SKIP
            ...     print(out.outputs[0].text, end="")
        """
        outputs: queue.Queue = queue.Queue()
        request_id = self.add_request(prompt, params, request_id, outputs.put)
        finished = False
        try:
            while not finished:
                out = outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    def generate_sync(self, prompts: str | list[int] | Seq[str | list[int]], params: SamplingParams
                      ) -> GenerationResult | list[GenerationResult]:
        """Run one prompt (or a list, batched together) to completion and return the results.

        Example:
            >>> r = engine.generate_sync("The sky is", SamplingParams(max_new_tokens=5, temperature=0))  # doctest: +SKIP
            >>> r.outputs[0].finish_reason                                                             # doctest: +SKIP
            'length'
        """
        single = isinstance(prompts, str) or (bool(prompts) and isinstance(prompts[0], int))
        batch = [prompts] if single else list(prompts)
        done: queue.Queue = queue.Queue()
        accumulators = {}
        for prompt in batch:
            rid = uuid.uuid4().hex
            accumulators[rid] = ResultAccumulator(rid, params.n)
            self.add_request(prompt, params, rid, done.put)
        remaining = len(batch)
        while remaining:
            out = done.get()
            accumulators[out.request_id].add(out)
            remaining -= out.finished
        results = [a.result() for a in accumulators.values()]
        return results[0] if single else results

    def stats(self) -> EngineStats:
        """Counters and queue sizes, safe to read from any thread (values may be one step old)."""
        bm, sched = self.block_manager, self.scheduler
        return EngineStats(
            num_requests=len(sched.requests),
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            kv_blocks_total=bm.num_blocks, kv_blocks_used=bm.num_used, kv_blocks_free=bm.num_free,
            block_size=bm.block_size,
            prompt_tokens_total=sched.prompt_tokens_total,
            generated_tokens_total=sched.generated_tokens_total,
            prefix_cache_hit_tokens=sched.prefix_cache_hit_tokens,
            num_preemptions=sched.num_preemptions,
            num_steps=sched.num_steps,
            last_batch_size=sched.last_batch_size,
        )

    def shutdown(self) -> None:
        """Abort every request and stop the loop thread."""
        if self._stopped:
            return
        self._stopped = True
        self._inbox.put(("stop", None))
        self._thread.join(timeout=30)
        release_kv_bytes(self)
        if self.runner.device.type == "cuda" and not self._thread.is_alive():
            # the GPU's memory goes back now, not when this object is collected: a notebook pausing an endpoint
            # wants it for its own tensors
            self.runner.release()
            self.model = None
            torch.cuda.empty_cache()

    def __enter__(self) -> "LLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                if not self._drain_inbox(block=not self.scheduler.has_work()):
                    break
                if not self.scheduler.has_work():
                    continue
                try:
                    self._step()
                except Exception as exc:  # a failed forward fails the requests in it, not the engine
                    logger.exception("engine step failed")
                    message = f"{type(exc).__name__}: {exc}"
                    if _is_out_of_memory(exc):
                        message = (f"{OUT_OF_MEMORY}: the step's activations could not be allocated ({exc}); retry "
                                   f"when fewer requests run, or lower max_batch_prefill_tokens")
                    self._emit_all(self.scheduler.fail_running(message))
        self._emit_all(self.scheduler.finish_all("abort"))

    def _drain_inbox(self, block: bool) -> bool:
        try:
            item = self._inbox.get(block=block)
        except queue.Empty:
            return True
        while True:
            kind, payload = item
            if kind == "stop":
                return False
            if kind == "add":
                self.scheduler.add_request(payload)
            elif kind == "abort":
                finished = self.scheduler.finish_request(payload, "abort")
                if finished is not None:
                    self._emit_all([finished])
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _step(self) -> None:
        step = self.scheduler.schedule()
        if step.empty:   # waiting work that does not fit yet: let other threads run
            time.sleep(0.001)
            return
        output = self.runner.run(step)
        self._emit_all(self.scheduler.update_from_output(step, output))

    @staticmethod
    def _emit_all(outputs: list[tuple[Request, RequestOutput]]) -> None:
        for request, out in outputs:
            try:
                request.on_output(out)
            except Exception:  # a consumer gone away (closed event loop) must not stop the engine
                logger.debug("dropping output of request %s", request.request_id, exc_info=True)
