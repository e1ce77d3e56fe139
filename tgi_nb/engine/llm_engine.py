"""The engine: a loop thread that schedules, runs and samples, and thread-safe ways in and out.

Requests enter through a thread-safe inbox; the loop thread owns every scheduler, block manager and
model structure, so nothing else ever touches them. Outputs leave through a per-request callback:
``generate`` (async) hands them to the caller's event loop with ``call_soon_threadsafe``, ``stream``
(blocking) through a ``queue.Queue``. No event loop ever waits on a forward pass.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import queue
import random
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator, Optional, Sequence as Seq

import torch

from .block_manager import BlockManager
from .capacity import (CapacityPlan, CapacityRequest, ModelShape, choose_num_threads, kv_budget_bytes,
                       plan_capacity, read_memory_budget, release_kv_bytes, reserve_kv_bytes)
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .model_runner import ModelRunner, PromptRows
from .outputs import (OUT_OF_MEMORY, CompletionDelta, GenerationResult, RequestOutput, ResultAccumulator,
                      TokenLogprob, TopLogprob)
from .sampler import SampledToken, sample
from .sampling_params import SamplingParams, ValidationError
from .scheduler import Scheduler
from .sequence import Request, Sequence, SequenceStatus

logger = logging.getLogger("tgi_nb")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float64": torch.float64}


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


def tensor_bytes(obj, _seen: Optional[set] = None, _depth: int = 0) -> int:
    """Bytes of the distinct tensors reachable from ``obj`` through attributes, lists, tuples and dicts (shared
    storage, such as tied embeddings, counted once): what a model's weights take.

    Example:
        >>> w = torch.zeros(4, 8)
        >>> tensor_bytes({"embed": w, "lm_head": w, "norm": torch.zeros(8)})
        160
    """
    seen = set() if _seen is None else _seen
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.device.type)
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if _depth > 4:
        return 0
    if isinstance(obj, torch.nn.Module):
        return sum(tensor_bytes(t, seen) for t in (*obj.parameters(), *obj.buffers()))
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    elif hasattr(obj, "__dict__"):
        items = vars(obj).values()
    else:
        return 0
    return sum(tensor_bytes(item, seen, _depth + 1) for item in items)


def _eos_token_ids(model_dir: Path, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen = model_dir / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class LLMEngine:
    """Continuous-batching generation over a paged KV cache, in a thread of its own.

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
        from transformers import AutoConfig, AutoTokenizer

        from tgi_nb.models import resolve_model, source_gguf
        from tgi_nb.models.hf_model import TransformersModel
        from tgi_nb.models.llama import LlamaModel, is_llama_family

        config = dataclasses.replace(config or EngineConfig(), **overrides)
        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = _DTYPES[config.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
        kv_dtype = _DTYPES[config.kv_cache_dtype] if config.kv_cache_dtype else dtype
        threads = None
        if device.type == "cpu":
            # torch's intra-op pool; the native kernels take torch.get_num_threads() as their own count
            threads = choose_num_threads(config.num_threads)
            torch.set_num_threads(threads.count)

        started = time.perf_counter()
        resolved = resolve_model(config.model_id, revision=config.revision)
        self.model_id = config.model_id or resolved.model_id
        self.model_dir = Path(resolved.path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        if config.chat_template:
            self.tokenizer.chat_template = config.chat_template
        hf_config = AutoConfig.from_pretrained(self.model_dir, trust_remote_code=config.trust_remote_code)
        if is_llama_family(hf_config):
            gguf_file = source_gguf(self.model_dir) if config.quantize is None else None
            self.model = LlamaModel.load(self.model_dir, dtype=dtype, device=device, config=hf_config,
                                         gguf_file=gguf_file,
                                         quantize=config.quantize if config.quantize != "float" else None,
                                         numerics=config.numerics)
        else:  # transformers' own modules, our paged attention and cache
            self.model = TransformersModel.load(self.model_dir, dtype=dtype, device=device,
                                                trust_remote_code=config.trust_remote_code)
        self.eos_token_ids = _eos_token_ids(self.model_dir, self.tokenizer)
        self.vocab_size = self.model.spec.vocab_size
        self.weights_bytes = tensor_bytes(self.model)

        # Planned once the weights are loaded, so that the memory they take is already out of the headroom.
        self.memory_budget = read_memory_budget() if device.type == "cpu" else None
        spec = self.model.spec
        self.capacity: CapacityPlan = plan_capacity(
            ModelShape(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.max_position_embeddings),
            CapacityRequest(max_input_tokens=config.max_input_tokens, max_total_tokens=config.max_total_tokens,
                            max_batch_prefill_tokens=config.max_batch_prefill_tokens,
                            max_batch_total_tokens=config.max_batch_total_tokens,
                            kv_cache_memory=config.kv_cache_memory, max_num_seqs=config.max_num_seqs,
                            max_concurrent_requests=config.max_concurrent_requests, block_size=config.block_size,
                            kv_dtype_bytes=kv_dtype.itemsize),
            None if config.kv_cache_memory else kv_budget_bytes(
                self.memory_budget.headroom if self.memory_budget else None, str(device)))
        plan = self.capacity
        for lowering in plan.lowerings:
            logger.warning("%s", lowering.message())
        if self.memory_budget is not None:
            logger.info("%s", self.memory_budget.describe())
        logger.info("%s", plan.sizing)
        if threads is not None:
            logger.info("%s", threads.reason)
        self.max_total_tokens = plan.max_total_tokens
        self.max_input_tokens = plan.max_input_tokens
        self.config = dataclasses.replace(config, max_total_tokens=plan.max_total_tokens,
                                          max_input_tokens=plan.max_input_tokens,
                                          max_batch_prefill_tokens=plan.max_batch_prefill_tokens,
                                          max_batch_total_tokens=plan.max_batch_total_tokens,
                                          dtype=str(dtype).split(".")[-1], kv_cache_dtype=str(kv_dtype).split(".")[-1],
                                          device=device.type, num_threads=torch.get_num_threads())

        num_blocks = plan.num_blocks
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, plan.max_batch_prefill_tokens)
        self.runner = ModelRunner(self.model, num_blocks, config.block_size, kv_dtype)
        reserve_kv_bytes(self, plan.kv_cache_bytes)
        formats = getattr(self.model, "weight_formats", lambda: str(dtype))()
        from tgi_nb.models.quant import QTYPE_IDS, kernel_variant

        if any(q in formats for q in QTYPE_IDS):   # how quantized products compute, and on what
            formats += f"; {config.numerics} numerics on the {kernel_variant() or 'torch'} kernels"
        logger.info("engine ready: %s (%s) on %s %s, weights %.0f MiB (%s), %d KV blocks x %d tokens (%.0f MiB %s, "
                    "resident as used), threads=%d, %.1fs",
                    self.model_id, resolved.source, device, dtype, self.weights_bytes / 2**20, formats, num_blocks,
                    config.block_size, plan.kv_cache_bytes / 2**20, str(kv_dtype).split(".")[-1],
                    torch.get_num_threads(), time.perf_counter() - started)

        self._inbox: queue.Queue = queue.Queue()
        self._requests: dict[str, Request] = {}
        self._token_text_cache: dict[int, str] = {}
        self._prompt_tokens_total = 0
        self._generated_tokens_total = 0
        self._prefix_hit_tokens = 0
        self._num_steps = 0
        self._last_batch_size = 0
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
                    add_special_tokens: bool = False) -> str:
        """Validate and queue a request; ``on_output`` is called from the engine thread with each
        ``RequestOutput``. Raises ``ValidationError`` (naming the field) before anything is queued."""
        if self._stopped:
            raise RuntimeError("the engine has been shut down")
        token_ids = self.tokenize(prompt, add_special_tokens)
        if not token_ids:
            raise ValidationError("prompt", "prompt: must contain at least one token")
        if len(token_ids) > self.max_input_tokens:
            raise ValidationError("prompt", f"prompt: {len(token_ids)} tokens is more than max_input_tokens "
                                            f"({self.max_input_tokens})")
        if len(token_ids) + params.max_new_tokens > self.max_total_tokens:
            raise ValidationError(
                "max_new_tokens",
                f"max_new_tokens: prompt ({len(token_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                f"must be <= max_total_tokens ({self.max_total_tokens})")
        blocks = self._blocks_needed_alone(len(token_ids), params)
        if blocks > self.block_manager.num_blocks:
            bs = self.block_manager.block_size
            raise ValidationError(
                "n", f"n: {params.n} samples of up to {len(token_ids) + params.max_new_tokens} tokens need "
                     f"{blocks * bs} tokens of KV cache, more than its max_batch_total_tokens "
                     f"({self.block_manager.num_blocks * bs}); ask for fewer samples or fewer max_new_tokens")
        request_id = request_id or uuid.uuid4().hex
        request = Request(request_id, token_ids, params, on_output or (lambda _: None), time.monotonic())
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
        bm = self.block_manager
        return EngineStats(
            num_requests=len(self._requests),
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_total=bm.num_blocks, kv_blocks_used=bm.num_used, kv_blocks_free=bm.num_free,
            block_size=bm.block_size,
            prompt_tokens_total=self._prompt_tokens_total,
            generated_tokens_total=self._generated_tokens_total,
            prefix_cache_hit_tokens=self._prefix_hit_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self._num_steps,
            last_batch_size=self._last_batch_size,
        )

    def shutdown(self) -> None:
        """Abort every request and stop the loop thread."""
        if self._stopped:
            return
        self._stopped = True
        self._inbox.put(("stop", None))
        self._thread.join(timeout=30)
        release_kv_bytes(self)

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
                    for request in list(self._requests.values()):
                        if any(s.status is SequenceStatus.RUNNING for s in request.seqs):
                            self._finish_request(request, "error", message)
        for request in list(self._requests.values()):
            self._finish_request(request, "abort")

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
                self._requests[payload.request_id] = payload
                self.scheduler.add(payload.seqs[0])
            elif kind == "abort" and payload in self._requests:
                self._finish_request(self._requests[payload], "abort")
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _step(self) -> None:
        step = self.scheduler.schedule()
        if step.empty:
            time.sleep(0.001)
            return
        now = time.monotonic()
        for seq in step.admitted:
            seq.request.first_scheduled = now
            self._prefix_hit_tokens += seq.num_computed_tokens
        self.runner.copy_blocks(step.block_copies)
        logits, sampling, prompt_rows = self.runner.run(step)
        for rows in prompt_rows:
            self._score_prompt(rows)
        self._num_steps += 1
        self._last_batch_size = len(step.decodes) + len(step.prefills)
        self._generated_tokens_total += len(step.decodes)
        for seq in step.decodes:
            seq.num_computed_tokens += 1
            self.block_manager.register_computed(seq)
        for seq, n in step.prefills:
            seq.num_computed_tokens += n
            self._prompt_tokens_total += n
            self.block_manager.register_computed(seq)

        rows = list(range(len(sampling)))
        for row, seq in enumerate(list(sampling)):
            if seq.index == 0 and seq.num_output_tokens == 0:   # the prompt is done: start the other samples
                for child in seq.request.seqs[1:]:
                    if child.status is SequenceStatus.FORK_PENDING:
                        self.block_manager.fork(seq, child)
                        self.scheduler.add_running(child)
                        sampling.append(child)
                        rows.append(row)
        if len(rows) != logits.shape[0]:
            logits = logits[rows]
        sampled = sample(logits, sampling)

        deltas: dict[str, list[CompletionDelta]] = {}
        for seq, token in zip(sampling, sampled):
            deltas.setdefault(seq.request.request_id, []).append(self._append(seq, token))
        for request_id, request_deltas in deltas.items():
            request = self._requests.get(request_id)
            if request is None:
                continue
            queue_time = None
            if not request.started:
                request.started = True
                queue_time = request.first_scheduled - request.arrival
            finished = request.finished
            if finished:
                del self._requests[request_id]
            self._emit(request, RequestOutput(request_id, request.prompt_token_ids, request_deltas, finished,
                                              request.num_cached_tokens, queue_time=queue_time,
                                              prompt_logprobs=request.prompt_logprobs if queue_time is not None
                                              else None))

    def _score_prompt(self, rows: PromptRows) -> None:
        """Log-probability (and top alternatives) of each prompt token the chunk's rows predict."""
        request = rows.seq.request
        k = request.params.prompt_logprobs
        logprobs = torch.log_softmax(rows.logits, dim=-1)
        targets = [request.prompt_token_ids[p + 1] for p in rows.positions]
        chosen = logprobs.gather(1, torch.tensor(targets)[:, None])[:, 0].tolist()
        if k:
            top_values, top_ids = (t.tolist() for t in logprobs.topk(k, dim=-1))
        else:
            top_values = top_ids = [[]] * len(targets)
        for i, position in enumerate(rows.positions):
            request.prompt_logprobs[position + 1] = self._token_logprob(targets[i], chosen[i],
                                                                        zip(top_ids[i], top_values[i]))

    def _append(self, seq: Sequence, token: SampledToken) -> CompletionDelta:
        """Add a sampled token to a sequence, detokenize, check every stop condition."""
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
        if finish is None and (seq.num_output_tokens >= params.max_new_tokens
                               or len(seq.token_ids) >= self.max_total_tokens):
            finish = "length"
            stop_reason = detok.check_stop(detok.flush())
            if stop_reason is not None:
                finish = "stop"
        logprobs = None
        if token.logprob is not None:
            logprobs = [self._token_logprob(token_id, token.logprob, token.top or [])]
        delta = CompletionDelta(seq.index, detok.take_output(final=finish is not None), [token_id], logprobs,
                                finish, stop_reason)
        if finish is not None:
            seq.finish_reason, seq.stop_reason = finish, stop_reason
            self.scheduler.finish(seq)
        return delta

    def _token_logprob(self, token_id: int, logprob: float, top) -> TokenLogprob:
        """A token's log-probability entry; ``top`` gives (token id, log-probability) alternatives."""
        return TokenLogprob(token_id, self._token_text(token_id), logprob,
                            [TopLogprob(t, self._token_text(t), lp) for t, lp in top])

    def _token_text(self, token_id: int) -> str:
        text = self._token_text_cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self._token_text_cache[token_id] = text
        return text

    def _finish_request(self, request: Request, reason: str, error: Optional[str] = None) -> None:
        deltas = []
        for seq in request.seqs:
            if seq.status is not SequenceStatus.FINISHED:
                self.scheduler.finish(seq)
                seq.finish_reason = reason
                deltas.append(CompletionDelta(seq.index, seq.detokenizer.take_output(final=True), [],
                                              finish_reason=reason))
        self._requests.pop(request.request_id, None)
        self._emit(request, RequestOutput(request.request_id, request.prompt_token_ids, deltas, True,
                                          request.num_cached_tokens, error))

    def _emit(self, request: Request, out: RequestOutput) -> None:
        try:
            request.on_output(out)
        except Exception:  # a consumer gone away (closed event loop) must not stop the engine
            logger.debug("dropping output of request %s", request.request_id, exc_info=True)
