"""tgi_nb's engine against transformers' ways of generating, on one workload, in one process.

    .venv/bin/python benchmarks/bench_engine.py                    # everything (needs the machine to itself)
    .venv/bin/python benchmarks/bench_engine.py --markdown         # plus a table for docs/benchmarks.md
    .venv/bin/python benchmarks/bench_engine.py --num-requests 4 --max-output 16 --sequential-requests 2
                                                                   # smoke test, about a minute

The workload (benchmarks/workload.py): 64 requests, prompts of 16-512 tokens and outputs of 16-256 tokens drawn
uniformly (seeded), greedy, ``ignore_eos`` so every system generates exactly the requested number of tokens,
the default model (SmolLM2-135M-Instruct, the bundled copy offline) in float32 on CPU (bfloat16 on CUDA). Every
request arrives at once (time 0). Systems, run one after the other, each model freed before the next:

- ``tgi_nb``: our engine; every request submitted with ``LLMEngine.add_request`` at once.
- ``hf_generate``: transformers ``generate``, one request at a time. It is slow, so only the first
  ``--sequential-requests`` requests run and its rates are over those (the table says so).
- ``hf_padded``: transformers ``generate`` on batches of ``--padded-batch-size`` left-padded prompts in arrival
  order; a batch runs until its longest output is done (what padded batching costs), and only the requested
  tokens count as output.
- ``hf_generate_batch``: transformers' own continuous batching (the manager behind ``generate_batch``, used
  directly because ``generate_batch`` takes one ``max_new_tokens`` for all requests), with the attention it
  accepts (``--cb-attn``, default sdpa). A failure is reported in the table, not raised.
- ``decode``: single-stream decode speed: one 32-token prompt, 256 new tokens, through tgi_nb and through
  ``generate``; decode tok/s = (tokens - 1) / (time of last token - time of first token), i.e. without prefill,
  best of ``--decode-repeats``. The ceiling is memory bandwidth: every decode step reads all linear weights and
  the lm_head (not the embedding, which is a gather), so ceiling tok/s = measured streaming-read bandwidth /
  those bytes. Bandwidth is the best of several ``x.sum()`` and ``torch.mv`` passes over a buffer far larger than
  the last-level cache, with the same threads, measured before the first system and after the last.

Metrics follow ``vllm bench serve``: output tok/s = generated tokens / wall time; total tok/s adds prompt tokens;
TTFT = time from arrival (time 0) to the first token; TPOT = (E2EL - TTFT) / (tokens - 1); E2EL = time from
arrival to the last token. "tgi_nb x" is tgi_nb's output tok/s divided by the system's. Targets (issue 2, on the
2-core CPU machine): tgi_nb >= 3x hf_generate_batch, >= 2x hf_padded, single-stream decode >= 25 tok/s.
The greedy outputs of each system are compared with tgi_nb's as a sanity check (near-ties can flip in float32).

Options: --skip SYSTEM (repeatable: tgi_nb, hf_generate, hf_padded, hf_generate_batch, decode), --json PATH,
--markdown, --num-requests, --min/--max-prompt, --min/--max-output, --seed, --threads, --device, --dtype.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workload import BenchRequest, add_workload_arguments, describe, log, make_workload, percentile  # noqa: E402

SYSTEMS = ("tgi_nb", "hf_generate", "hf_padded", "hf_generate_batch", "decode")
TARGETS = {"hf_generate_batch": 3.0, "hf_padded": 2.0}
DECODE_TARGET_TOK_S = 25.0
DECODE_PROMPT, DECODE_TOKENS = 32, 256


@dataclass
class RunResult:
    """One system's run over (part of) the workload; times in seconds from the workload's start."""

    system: str
    label: str
    num_requests: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0          # requested tokens only (what a user gets)
    computed_tokens: int = 0        # tokens the system generated, padding waste included
    wall_s: float = 0.0
    ttft: list[float] = field(default_factory=list)
    e2el: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    ttft_comparable: bool = True    # False when requests did not all wait from time 0 (sequential subset)
    note: str = ""
    error: Optional[str] = None
    matches_tgi_nb: Optional[str] = None
    extra: dict = field(default_factory=dict)
    outputs: list[list[int]] = field(default_factory=list, repr=False)

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s else 0.0

    @property
    def total_tok_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.wall_s if self.wall_s else 0.0

    def summary(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("ttft", "e2el", "tpot", "outputs")}
        d.update(output_tok_s=self.output_tok_s, total_tok_s=self.total_tok_s,
                 request_s=self.num_requests / self.wall_s if self.wall_s else 0.0)
        for name in ("ttft", "tpot", "e2el"):
            values = getattr(self, name)
            if values:
                d[name] = {"mean": statistics.fmean(values), "p50": percentile(values, 50),
                           "p99": percentile(values, 99)}
        return d


def latencies(result: RunResult, first: list[float], last: list[float], counts: list[int]) -> None:
    result.ttft = list(first)
    result.e2el = list(last)
    result.tpot = [(e - t) / (n - 1) for t, e, n in zip(first, last, counts) if n > 1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def warmup_workload(workload: list[BenchRequest], seed: int, vocab_size: int) -> list[BenchRequest]:
    """A few short requests with the workload's range of prompt lengths but other tokens (so that nothing
    the warm-up computes is a prefix-cache hit later)."""
    return make_workload(4, 16, max(16, max(r.prompt_len for r in workload)), 4, 8, seed=seed + 1000,
                         vocab_size=vocab_size)


# --------------------------------------------------------------------------------------------- tgi_nb
def greedy(n: int):
    from tgi_nb.engine import SamplingParams
    return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)


def engine_run(engine, requests: list[BenchRequest]) -> tuple[float, list[float], list[float], list[list[int]],
                                                              list[list[float]], list[Optional[str]]]:
    """Submit every request at once; return wall time, first/last token times, tokens, per-output times."""
    n = len(requests)
    first, last = [0.0] * n, [0.0] * n
    tokens: list[list[int]] = [[] for _ in range(n)]
    stamps: list[list[float]] = [[] for _ in range(n)]
    errors: list[Optional[str]] = [None] * n
    remaining = [n]
    done = threading.Event()

    def callback(i: int):
        def on_output(out) -> None:  # runs on the engine thread, which is the only writer
            now = time.perf_counter()
            new = [t for d in out.outputs for t in d.token_ids]
            if new:
                if not tokens[i]:
                    first[i] = now
                tokens[i].extend(new)
                stamps[i].extend([now] * len(new))
            if out.finished:
                last[i] = now
                errors[i] = out.error
                remaining[0] -= 1
                if not remaining[0]:
                    done.set()
        return on_output

    t0 = time.perf_counter()
    for i, r in enumerate(requests):
        engine.add_request(r.prompt_token_ids, greedy(r.max_new_tokens), on_output=callback(i))
    done.wait()
    wall = time.perf_counter() - t0
    return wall, [f - t0 for f in first], [e - t0 for e in last], tokens, stamps, errors


def run_tgi_nb(args, model_path: Path, workload: list[BenchRequest], decode_prompt: BenchRequest
               ) -> tuple[Optional[RunResult], Optional[dict]]:
    from tgi_nb.engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(model_id=str(model_path), device=args.device, dtype=args.dtype,
                                    num_threads=args.threads))
    try:
        engine_run(engine, warmup_workload(workload, args.seed, engine.vocab_size))
        result = None
        if "tgi_nb" not in args.skip:
            log(f"[tgi_nb] {len(workload)} requests at once ...")
            before = engine.stats()
            wall, first, last, tokens, _, errors = engine_run(engine, workload)
            after = engine.stats()
            result = RunResult("tgi_nb", "tgi_nb engine (continuous batching, paged KV)")
            result.num_requests = len(workload)
            result.prompt_tokens = sum(r.prompt_len for r in workload)
            result.output_tokens = result.computed_tokens = sum(len(t) for t in tokens)
            result.wall_s = wall
            result.outputs = tokens
            latencies(result, first, last, [len(t) for t in tokens])
            result.extra = {"preemptions": after.num_preemptions - before.num_preemptions,
                            "prefix_cache_hit_tokens": after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens,
                            "steps": after.num_steps - before.num_steps,
                            "kv_blocks_total": after.kv_blocks_total, "block_size": after.block_size,
                            "max_batch_prefill_tokens": engine.config.max_batch_prefill_tokens,
                            "max_num_seqs": engine.config.max_num_seqs}
            bad = [i for i, (t, r) in enumerate(zip(tokens, workload)) if len(t) != r.max_new_tokens]
            failed = [e for e in errors if e]
            if failed or bad:
                result.error = f"{len(failed)} failed, {len(bad)} with the wrong length: {failed[:1]}"
            log(f"[tgi_nb] {wall:.1f} s, {result.output_tok_s:.1f} output tok/s")
        decode = None
        if "decode" not in args.skip:
            best = None
            for _ in range(args.decode_repeats):
                _, _, _, tokens, stamps, _ = engine_run(engine, [decode_prompt])
                s = stamps[0]
                rate = (len(s) - 1) / (s[-1] - s[0])
                best = rate if best is None else max(best, rate)
            decode = {"tok_s": best, "tokens": len(tokens[0]), "output": tokens[0]}
            log(f"[decode] tgi_nb {best:.1f} tok/s")
        return result, decode
    finally:
        engine.shutdown()
        del engine
        free_memory()


# --------------------------------------------------------------------------------------------- transformers
class TimingStreamer:
    """Records when each generate step's tokens come out (the first ``put`` is the prompt)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        sync(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def load_hf(model_path: Path, device: torch.device, dtype: torch.dtype, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=attn)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return model, tokenizer


def exact_length_config(model, tokenizer, n: int):
    """Greedy, exactly ``n`` new tokens (``min_new_tokens`` masks EOS until then)."""
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n,
                            eos_token_id=model.generation_config.eos_token_id, pad_token_id=pad)


@torch.inference_mode()
def hf_generate_one(model, tokenizer, ids: list[int], n: int, device: torch.device) -> tuple[list[int], list[float]]:
    streamer = TimingStreamer(device)
    input_ids = torch.tensor([ids], device=device)
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                         generation_config=exact_length_config(model, tokenizer, n), streamer=streamer)
    return out[0, len(ids):].tolist(), streamer.times


def run_hf_sequential(args, model, tokenizer, workload: list[BenchRequest], device) -> RunResult:
    subset = workload[:args.sequential_requests]
    result = RunResult("hf_generate", "transformers generate, one request at a time")
    result.note = (f"first {len(subset)} of {len(workload)} requests; rates over those"
                   if len(subset) < len(workload) else "")
    log(f"[hf_generate] {len(subset)} requests one at a time ...")
    hf_generate_one(model, tokenizer, subset[0].prompt_token_ids[:16], 4, device)  # warm-up
    first, last, counts, isolated = [], [], [], []
    t0 = time.perf_counter()
    for i, r in enumerate(subset):
        start = time.perf_counter()
        tokens, times = hf_generate_one(model, tokenizer, r.prompt_token_ids, r.max_new_tokens, device)
        result.outputs.append(tokens)
        first.append(times[0] - t0)
        last.append(times[-1] - t0)
        counts.append(len(tokens))
        isolated.append(times[0] - start)
        log(f"[hf_generate] {i + 1}/{len(subset)} {time.perf_counter() - t0:.0f} s")
    result.wall_s = time.perf_counter() - t0
    result.num_requests = len(subset)
    result.prompt_tokens = sum(r.prompt_len for r in subset)
    result.output_tokens = result.computed_tokens = sum(counts)
    latencies(result, first, last, counts)
    result.ttft_comparable = len(subset) == len(workload)
    result.extra = {"ttft_isolated_mean_s": statistics.fmean(isolated)}
    log(f"[hf_generate] {result.wall_s:.1f} s, {result.output_tok_s:.1f} output tok/s")
    return result


@torch.inference_mode()
def run_hf_padded(args, model, tokenizer, workload: list[BenchRequest], device) -> RunResult:
    b = args.padded_batch_size
    result = RunResult("hf_padded", f"transformers generate, padded batches of {b}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def batch_inputs(batch: list[BenchRequest]):
        width = max(r.prompt_len for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, r in enumerate(batch):  # left padding: every prompt ends where generation starts
            ids[j, width - r.prompt_len:] = torch.tensor(r.prompt_token_ids)
            mask[j, width - r.prompt_len:] = 1
        return ids.to(device), mask.to(device)

    warm_ids, warm_mask = batch_inputs([BenchRequest(r.prompt_token_ids[:16], 4) for r in workload[:2]])
    model.generate(warm_ids, attention_mask=warm_mask, generation_config=exact_length_config(model, tokenizer, 4))
    log(f"[hf_padded] {len(workload)} requests in batches of {b} ...")
    first, last, counts = [], [], []
    t0 = time.perf_counter()
    for start in range(0, len(workload), b):
        batch = workload[start:start + b]
        ids, mask = batch_inputs(batch)
        n = max(r.max_new_tokens for r in batch)
        streamer = TimingStreamer(device)
        out = model.generate(ids, attention_mask=mask, generation_config=exact_length_config(model, tokenizer, n),
                             streamer=streamer)
        result.computed_tokens += len(batch) * n
        for j, r in enumerate(batch):
            result.outputs.append(out[j, ids.shape[1]:ids.shape[1] + r.max_new_tokens].tolist())
            first.append(streamer.times[0] - t0)
            # a request counts as done when its own last token is out, not when its batch ends
            last.append(streamer.times[r.max_new_tokens - 1] - t0)
            counts.append(r.max_new_tokens)
        log(f"[hf_padded] {start + len(batch)}/{len(workload)} {time.perf_counter() - t0:.0f} s")
    result.wall_s = time.perf_counter() - t0
    result.num_requests = len(workload)
    result.prompt_tokens = sum(r.prompt_len for r in workload)
    result.output_tokens = sum(counts)
    latencies(result, first, last, counts)
    result.note = (f"generated {result.computed_tokens} tokens for {result.output_tokens} requested "
                   f"({100 * (1 - result.output_tokens / result.computed_tokens):.0f}% wasted)")
    log(f"[hf_padded] {result.wall_s:.1f} s, {result.output_tok_s:.1f} output tok/s")
    return result


def run_hf_generate_batch(args, model_path: Path, workload: list[BenchRequest], device, dtype) -> RunResult:
    from transformers import GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    # not under inference_mode: the manager's thread updates its cache in place outside of it
    result = RunResult("hf_generate_batch", f"transformers continuous batching (generate_batch, {args.cb_attn})")
    model = None
    try:
        model, tokenizer = load_hf(model_path, device, dtype, args.cb_attn)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # eos_token_id=-1 disables EOS: every request generates exactly max_new_tokens (ignore_eos)
        config = GenerationConfig(do_sample=False, max_new_tokens=max(r.max_new_tokens for r in workload),
                                  eos_token_id=-1, pad_token_id=pad)
        hints = WorkloadHints(max_prompt_length=max(r.prompt_len for r in workload),
                              max_generated_length=max(r.max_new_tokens for r in workload),
                              num_requests=len(workload))
        with model.continuous_batching_context_manager(generation_config=config, workload_hints=hints,
                                                       block=True, timeout=60) as manager:
            def run(requests: list[BenchRequest], prefix: str) -> tuple[float, dict]:
                t0 = time.perf_counter()
                ids = [manager.add_request(r.prompt_token_ids, request_id=f"{prefix}{i}",
                                           max_new_tokens=r.max_new_tokens, eos_token_id=-1,
                                           record_timestamps=True) for i, r in enumerate(requests)]
                results = {}
                while len(results) < len(ids):
                    out = manager.get_result(timeout=1)
                    if out is not None and out.is_finished():
                        results[out.request_id] = out
                    elif out is None and not manager.is_running():
                        raise RuntimeError("the continuous batching thread stopped: "
                                           f"{manager.background_thread_status.fatal_error!r}")
                return t0, {k: results[k] for k in ids}

            run(warmup_workload(workload, args.seed, model.config.vocab_size), "warm-")
            log(f"[hf_generate_batch] {len(workload)} requests at once ...")
            t0, results = run(workload, "bench-")
            wall = time.perf_counter() - t0
        errors = [o.error for o in results.values() if o.error]
        if errors:
            raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
        outs = list(results.values())
        result.outputs = [list(o.generated_tokens) for o in outs]
        result.wall_s = wall
        result.num_requests = len(workload)
        result.prompt_tokens = sum(r.prompt_len for r in workload)
        result.output_tokens = result.computed_tokens = sum(len(t) for t in result.outputs)
        latencies(result, [o.timestamps[0] - t0 for o in outs], [o.timestamps[-1] - t0 for o in outs],
                  [len(o.generated_tokens) for o in outs])
        log(f"[hf_generate_batch] {wall:.1f} s, {result.output_tok_s:.1f} output tok/s")
    except Exception as exc:  # noqa: BLE001 - a failing baseline is a result, not a crash
        result.error = f"{type(exc).__name__}: {exc}"
        log(f"[hf_generate_batch] failed: {result.error}\n{traceback.format_exc()}")
    finally:
        del model
        free_memory()
    return result


# --------------------------------------------------------------------------------------------- ceiling
def weight_bytes_per_token(model_path: Path, dtype: torch.dtype) -> int:
    """Bytes a decode step reads: every linear layer's weight (and bias) plus the lm_head; the embedding
    is a gather of one row and is left out. Built on the meta device, so nothing is allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            for p in (module.weight, module.bias):
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel() * p.element_size()
    return total


def measure_bandwidth(device: torch.device, size_bytes: int, repeats: int = 7) -> dict:
    """Best streaming-read bandwidth in bytes/s, from ``x.sum()`` and from ``torch.mv`` (the shape of a
    decode step's matrix-vector products), over a buffer far larger than the last-level cache."""
    n = size_bytes // 4
    x = torch.randn(n, device=device)
    cols = 1024
    w = x[: (n // cols) * cols].view(-1, cols)
    v = torch.randn(cols, device=device)
    rates = {}
    for name, fn, nbytes in (("sum", lambda: x.sum(), x.numel() * 4), ("mv", lambda: torch.mv(w, v), w.numel() * 4)):
        fn()
        sync(device)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            sync(device)
            best = min(best, time.perf_counter() - t)
        rates[name] = nbytes / best
    del x, w, v
    return rates


def run_decode_hf(args, model, tokenizer, prompt: BenchRequest, device) -> dict:
    best = None
    hf_generate_one(model, tokenizer, prompt.prompt_token_ids, 4, device)  # warm-up
    for _ in range(args.decode_repeats):
        tokens, times = hf_generate_one(model, tokenizer, prompt.prompt_token_ids, prompt.max_new_tokens, device)
        rate = (len(times) - 1) / (times[-1] - times[0])
        best = rate if best is None else max(best, rate)
    log(f"[decode] transformers generate {best:.1f} tok/s")
    return {"tok_s": best, "tokens": len(tokens), "output": tokens}


# --------------------------------------------------------------------------------------------- report
def machine_info(device: torch.device, threads: int) -> dict:
    import transformers

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError, AttributeError):
        mem = float("nan")
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    info = {"cpu": cpu, "cores": cores, "threads": threads, "memory_gib": round(mem, 1),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "os": platform.platform(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        import tgi_nb
        info["tgi_nb"] = getattr(tgi_nb, "__version__", "?")
    except ImportError:
        pass
    return info


def compare_outputs(result: RunResult, reference: RunResult) -> None:
    same = sum(a == b for a, b in zip(result.outputs, reference.outputs))
    result.matches_tgi_nb = f"{same}/{min(len(result.outputs), len(reference.outputs))}"


def fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table_rows(results: list[RunResult]) -> list[list[str]]:
    ref = next((r for r in results if r.system == "tgi_nb" and not r.error), None)
    rows = []
    for r in results:
        if r.error and not r.wall_s:
            rows.append([r.label, "-", "-", "-", "-", "-", "-", "-", "-", "-", f"FAILED: {r.error[:80]}"])
            continue
        speedup = ref.output_tok_s / r.output_tok_s if ref and r.output_tok_s else None
        ttft = statistics.fmean(r.ttft) if r.ttft and r.ttft_comparable else None
        tpot = statistics.fmean(r.tpot) * 1000 if r.tpot else None
        notes = [n for n in (r.note, f"same tokens as tgi_nb: {r.matches_tgi_nb}" if r.matches_tgi_nb else "",
                             f"ERROR: {r.error}" if r.error else "") if n]
        rows.append([r.label, str(r.num_requests), str(r.output_tokens), fmt(r.wall_s, ".1f"),
                     fmt(r.num_requests / r.wall_s, ".3f"), fmt(r.output_tok_s, ".1f"), fmt(r.total_tok_s, ".1f"),
                     "1.00x" if r is ref else (fmt(speedup, ".2f") + "x" if speedup else "-"),
                     fmt(ttft, ".2f"), fmt(tpot, ".0f"), "; ".join(notes)])
    return rows


HEADERS = ["system", "requests", "output tokens", "wall s", "req/s", "output tok/s", "total tok/s", "tgi_nb x",
           "mean TTFT s", "mean TPOT ms", "notes"]


def print_text(results: list[RunResult], decode: dict, targets: list[tuple[str, str, bool]], workload_line: str,
               info: dict) -> None:
    rows = table_rows(results)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(HEADERS)]
    print(f"\n{info['cpu']}, {info['cores']} cores, {info['threads']} threads"
          f"{', ' + info['gpu'] if info['gpu'] else ''}; torch {info['torch']}, transformers {info['transformers']}; "
          f"{info['date']}")
    print(f"workload: {workload_line}; greedy, ignore_eos, all requests arrive at t=0")
    print("  ".join(h.ljust(w) if i in (0, len(HEADERS) - 1) else h.rjust(w) for i, (h, w) in enumerate(zip(HEADERS, widths))))
    for row in rows:
        print("  ".join(c.ljust(w) if i in (0, len(row) - 1) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    for r in results:
        if r.error:
            print(f"{r.system} error: {r.error}")
        if r.system == "hf_generate" and not r.ttft_comparable and r.extra:
            print(f"hf_generate TTFT: not comparable (a subset run one by one); its prefill latency alone averages "
                  f"{r.extra['ttft_isolated_mean_s']:.2f} s")
    if decode:
        print("\nsingle-stream decode (32-token prompt, 256 new tokens, prefill excluded, best of "
              f"{decode['repeats']}):")
        for key, label in (("tgi_nb", "tgi_nb"), ("hf_generate", "transformers generate")):
            if key in decode:
                frac = decode[key]["tok_s"] / decode["ceiling_tok_s"]
                print(f"  {label:<22} {decode[key]['tok_s']:7.1f} tok/s  ({100 * frac:.0f}% of the ceiling)")
        print(f"  ceiling: {decode['weight_bytes'] / 1e6:.0f} MB of weights per token / "
              f"{decode['bandwidth_gb_s']:.1f} GB/s streaming read (sum {decode['bandwidth']['sum'] / 1e9:.1f}, "
              f"mv {decode['bandwidth']['mv'] / 1e9:.1f} GB/s) = {decode['ceiling_tok_s']:.1f} tok/s")
        if "same_tokens" in decode:
            print(f"  same 256 tokens from both: {'yes' if decode['same_tokens'] else 'no (a near-tie flipped?)'}")
    if targets:
        print("\ntargets:")
        for name, value, ok in targets:
            print(f"  {'PASS' if ok else 'FAIL'}  {name}: {value}")


def print_markdown(results: list[RunResult], decode: dict, targets: list[tuple[str, str, bool]],
                   workload_line: str, info: dict) -> None:
    print("\n<!-- benchmarks/bench_engine.py --markdown -->")
    print(f"Machine: {info['cpu']}, {info['cores']} cores ({info['threads']} threads used), "
          f"{info['memory_gib']} GiB RAM{', ' + info['gpu'] if info['gpu'] else ''}; Python {info['python']}, "
          f"torch {info['torch']}, transformers {info['transformers']}; {info['date']}.\n")
    print(f"Workload: {workload_line}; greedy, `ignore_eos`, all requests arrive at t=0.\n")
    print("| " + " | ".join(HEADERS) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(HEADERS) - 2) + ["---"]) + "|")
    for row in table_rows(results):
        print("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    if decode:
        print(f"\nSingle-stream decode (32-token prompt, 256 new tokens, prefill excluded, best of {decode['repeats']}):\n")
        print("| system | decode tok/s | share of the bandwidth ceiling |")
        print("|---|---:|---:|")
        for key, label in (("tgi_nb", "tgi_nb"), ("hf_generate", "transformers generate")):
            if key in decode:
                print(f"| {label} | {decode[key]['tok_s']:.1f} | "
                      f"{100 * decode[key]['tok_s'] / decode['ceiling_tok_s']:.0f}% |")
        print(f"| ceiling: {decode['weight_bytes'] / 1e6:.0f} MB of weights per token at "
              f"{decode['bandwidth_gb_s']:.1f} GB/s | {decode['ceiling_tok_s']:.1f} | 100% |")
    if targets:
        print("\nTargets:\n")
        for name, value, ok in targets:
            print(f"- {'✅' if ok else '❌'} {name}: {value}")


def main(argv: Optional[list[str]] = None) -> int:
    from tgi_nb.engine.budget import choose_num_threads
    from tgi_nb.models import resolve_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser)
    parser.add_argument("--sequential-requests", type=int, default=16,
                        help="how many of the workload's first requests hf_generate runs (default 16)")
    parser.add_argument("--padded-batch-size", type=int, default=16)
    parser.add_argument("--cb-attn", default="sdpa",
                        help="attn_implementation for transformers' continuous batching (sdpa, paged|eager, ...)")
    parser.add_argument("--decode-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads for every system "
                                                                  "(default: one per core)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--skip", action="append", default=[], choices=SYSTEMS, metavar="SYSTEM",
                        help=f"leave a system out (repeatable): {', '.join(SYSTEMS)}")
    parser.add_argument("--json", type=Path, default=None, help="write every result to this file")
    parser.add_argument("--markdown", action="store_true", help="also print markdown tables for docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.num_requests < 1 or args.sequential_requests < 1 or args.padded_batch_size < 1 or args.decode_repeats < 1:
        parser.error("--num-requests, --sequential-requests, --padded-batch-size and --decode-repeats must be >= 1")

    # a smaller --max-* alone (a smoke test) lowers the matching minimum with it
    args.min_prompt, args.min_output = min(args.min_prompt, args.max_prompt), min(args.min_output, args.max_output)

    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.threads = args.threads or choose_num_threads().count
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)

    resolved = resolve_model(args.model)
    model_path = Path(resolved.path)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    workload = make_workload(args.num_requests, args.min_prompt, args.max_prompt, args.min_output, args.max_output,
                             seed=args.seed, tokenizer=tokenizer)
    decode_prompt = make_workload(1, DECODE_PROMPT, DECODE_PROMPT, DECODE_TOKENS, DECODE_TOKENS,
                                  seed=args.seed + 2000, tokenizer=tokenizer)[0]
    workload_line = describe(workload)
    info = machine_info(device, args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    info["load_average_at_start"] = round(load, 2)
    if load > 0.5:
        # with every core busy, 2 intra-op threads wait on each other at every op: numbers drop many-fold
        log(f"WARNING: load average {load:.1f} - other processes are running; the numbers will not be "
            f"representative (the benchmark needs the machine to itself)")
    log(f"model {resolved.model_id} from {model_path} ({resolved.source}), {args.device} {args.dtype}, "
        f"{args.threads} threads; workload: {workload_line}")

    # bandwidth now, while no model holds memory, and again at the end; the best of both is the ceiling
    bandwidth_bytes = 512 << 20 if device.type == "cpu" else 2 << 30  # 16x a 32 MiB L3; well past a GPU's L2
    bandwidth = measure_bandwidth(device, bandwidth_bytes) if "decode" not in args.skip else {}

    results: list[RunResult] = []
    decode: dict = {}
    tgi, tgi_decode = None, None
    if not ("tgi_nb" in args.skip and "decode" in args.skip):
        tgi, tgi_decode = run_tgi_nb(args, model_path, workload, decode_prompt)
        torch.set_num_threads(args.threads)
    if tgi:
        results.append(tgi)
    if tgi_decode:
        decode["tgi_nb"] = tgi_decode

    need_hf = {"hf_generate", "hf_padded", "decode"} - set(args.skip)
    if need_hf:
        model, hf_tok = load_hf(model_path, device, dtype)
        try:
            if "hf_generate" not in args.skip:
                results.append(run_hf_sequential(args, model, hf_tok, workload, device))
            if "hf_padded" not in args.skip:
                results.append(run_hf_padded(args, model, hf_tok, workload, device))
            if "decode" not in args.skip:
                decode["hf_generate"] = run_decode_hf(args, model, hf_tok, decode_prompt, device)
        finally:
            del model
            free_memory()
    if "hf_generate_batch" not in args.skip:
        results.append(run_hf_generate_batch(args, model_path, workload, device, dtype))

    if decode:
        weight_bytes = weight_bytes_per_token(model_path, dtype)
        bandwidth = {k: max(v, bandwidth.get(k, 0.0)) for k, v in measure_bandwidth(device, bandwidth_bytes).items()}
        best_bw = max(bandwidth.values())
        decode.update(weight_bytes=weight_bytes, bandwidth=bandwidth, bandwidth_gb_s=best_bw / 1e9,
                      ceiling_tok_s=best_bw / weight_bytes, repeats=args.decode_repeats)
        if "tgi_nb" in decode and "hf_generate" in decode:
            same = decode["tgi_nb"].get("output") == decode["hf_generate"]["output"]
            decode["same_tokens"] = same

    if tgi:
        for r in results:
            if r is not tgi and r.outputs:
                compare_outputs(r, tgi)

    targets: list[tuple[str, str, bool]] = []
    if tgi and not tgi.error:
        for r in results:
            if r.system in TARGETS:
                need = TARGETS[r.system]
                if r.output_tok_s and not r.error:
                    ratio = tgi.output_tok_s / r.output_tok_s
                    targets.append((f"tgi_nb >= {need:g}x {r.system}", f"{ratio:.2f}x", ratio >= need))
                else:
                    targets.append((f"tgi_nb >= {need:g}x {r.system}", f"{r.system} failed", False))
    if "tgi_nb" in decode and device.type == "cpu":
        rate = decode["tgi_nb"]["tok_s"]
        targets.append((f"single-stream decode >= {DECODE_TARGET_TOK_S:g} tok/s", f"{rate:.1f} tok/s",
                        rate >= DECODE_TARGET_TOK_S))

    print_text(results, decode, targets, workload_line, info)
    if args.markdown:
        print_markdown(results, decode, targets, workload_line, info)
    if args.json:
        payload = {"machine": info, "model": {"id": resolved.model_id, "path": str(model_path),
                                              "source": resolved.source, "dtype": args.dtype, "device": args.device},
                   "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "workload": workload_line, "results": [r.summary() for r in results],
                   "decode": {k: ({kk: vv for kk, vv in v.items() if kk != "output"} if isinstance(v, dict) else v)
                              for k, v in decode.items()},
                   "targets": [{"target": n, "value": v, "met": ok} for n, v, ok in targets]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
        log(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
