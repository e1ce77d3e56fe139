"""tgi_nb's server over HTTP against the same engine in process, on the engine benchmark's workload, in one run.

    .venv/bin/python benchmarks/bench_serve.py                      # the full workload (needs the machine to itself)
    .venv/bin/python benchmarks/bench_serve.py --markdown           # plus a table for docs/benchmarks.md
    .venv/bin/python benchmarks/bench_serve.py --num-requests 4 --max-output 16     # smoke test

The workload is benchmarks/workload.py's, as bench_engine.py uses it: 64 requests, prompts of 16-512 tokens and
outputs of 16-256 tokens drawn uniformly (seeded), greedy, ``ignore_eos``, the default model (SmolLM2-135M-Instruct,
the bundled copy offline) in float32 on CPU. Every request arrives at time 0. Two systems, one after the other:

- ``engine``: ``LLMEngine.add_request`` for every request at once, in this process (bench_engine.py's tgi_nb run).
- ``http``: ``tgi-nb serve`` in a child process (``--server thread``: a ServerThread in this process instead),
  and one concurrent streaming client per request (httpx, asyncio) posting to /v1/completions with the prompt
  as text (the workload's text encodes back to exactly its ids), ``ignore_eos``, ``temperature=0`` and
  ``stream_options.include_usage``.

Metrics as ``vllm bench serve`` names them: TTFT (arrival to first token), TPOT ((E2EL - TTFT) / (tokens - 1)),
ITL (time between two streamed chunks), E2EL (arrival to last token), each as mean, p50 and p99; request/s,
output tok/s and total tok/s (prompt + output tokens over wall time). "http / engine" is the ratio of output
tok/s (target: at least 0.9).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workload import (BenchRequest, add_workload_arguments, describe, log, make_workload, markdown_table,  # noqa: E402
                      percentile, stop_process, stream_completion, wait_healthy)

TARGET_RATIO = 0.9


@dataclass
class ServeResult:
    """One system's run; times in seconds from the workload's start."""

    system: str
    num_requests: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    wall_s: float = 0.0
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    e2el: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s else 0.0

    def summary(self) -> dict:
        out = {"system": self.system, "num_requests": self.num_requests, "prompt_tokens": self.prompt_tokens,
               "output_tokens": self.output_tokens, "wall_s": self.wall_s,
               "request_s": self.num_requests / self.wall_s if self.wall_s else 0.0,
               "output_tok_s": self.output_tok_s,
               "total_tok_s": (self.prompt_tokens + self.output_tokens) / self.wall_s if self.wall_s else 0.0,
               "errors": self.errors[:5]}
        for name in ("ttft", "tpot", "itl", "e2el"):
            values = getattr(self, name)
            if values:
                out[name] = {"mean": statistics.fmean(values), "p50": percentile(values, 50),
                             "p99": percentile(values, 99)}
        return out


# ------------------------------------------------------------------------------------------------- engine
def run_engine(engine, workload: list[BenchRequest]) -> ServeResult:
    """Every request at once through ``add_request``; per-output timestamps from the engine thread."""
    import threading

    from tgi_nb.engine import SamplingParams

    n = len(workload)
    stamps: list[list[float]] = [[] for _ in range(n)]
    counts = [0] * n
    errors: list[str] = []
    remaining = [n]
    done = threading.Event()

    def callback(i: int):
        def on_output(out) -> None:
            now = time.perf_counter()
            new = sum(len(d.token_ids) for d in out.outputs)
            if new:
                stamps[i].append(now)
                counts[i] += new
            if out.error:
                errors.append(out.error)
            if out.finished:
                remaining[0] -= 1
                if not remaining[0]:
                    done.set()
        return on_output

    t0 = time.perf_counter()
    for i, r in enumerate(workload):
        engine.add_request(r.prompt_token_ids, SamplingParams(max_new_tokens=r.max_new_tokens, temperature=0,
                                                              ignore_eos=True), on_output=callback(i))
    done.wait()
    result = ServeResult("engine", n, sum(r.prompt_len for r in workload), sum(counts), time.perf_counter() - t0)
    result.errors = errors
    for s, count in zip(stamps, counts):
        result.ttft.append(s[0] - t0)
        result.e2el.append(s[-1] - t0)
        if count > 1:
            result.tpot.append((s[-1] - s[0]) / (count - 1))
        result.itl.extend(b - a for a, b in zip(s, s[1:]))
    return result


# ------------------------------------------------------------------------------------------------- http
async def _one(client, index: int, request: BenchRequest, t0: float, result: ServeResult) -> None:
    done = await stream_completion(client, request.prompt, request.max_new_tokens)
    if done.error:
        result.errors.append(f"request {index}: {done.error}")
        return
    stamps, tokens = done.stamps, done.completion_tokens or 0
    result.output_tokens += tokens
    result.ttft.append(stamps[0] - t0)
    result.e2el.append(stamps[-1] - t0)
    if tokens > 1:
        result.tpot.append((stamps[-1] - stamps[0]) / (tokens - 1))
    result.itl.extend(b - a for a, b in zip(stamps, stamps[1:]))


async def run_http_async(url: str, workload: list[BenchRequest]) -> ServeResult:
    import httpx

    limits = httpx.Limits(max_connections=len(workload) + 4, max_keepalive_connections=len(workload) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(None), limits=limits) as client:
        # warm-up: the server's first requests pay for imports and caches
        warm = make_workload(2, 16, 64, 4, 4, seed=4242)
        await asyncio.gather(*(_one(client, i, r, time.perf_counter(), ServeResult("warm"))
                               for i, r in enumerate(w for w in warm if w.prompt)))
        result = ServeResult("http", len(workload), sum(r.prompt_len for r in workload))
        t0 = time.perf_counter()
        await asyncio.gather(*(_one(client, i, r, t0, result) for i, r in enumerate(workload)))
        result.wall_s = time.perf_counter() - t0
    return result


def run_http(args, model_path: Path, workload: list[BenchRequest]) -> ServeResult:
    from tgi_nb.server.runner import bind_socket

    if args.server == "thread":
        from tgi_nb.engine import EngineConfig, LLMEngine
        from tgi_nb.server import ServerSettings, ServerThread, build_app

        engine = LLMEngine(EngineConfig(model_id=str(model_path), device=args.device, dtype=args.dtype,
                                        num_threads=args.threads))
        server = ServerThread(build_app(engine, ServerSettings(max_concurrent_requests=1024)), port=0).start()
        try:
            return asyncio.run(run_http_async(server.url, workload))
        finally:
            server.stop()
            engine.shutdown()
    sock = bind_socket(port=0)
    port = sock.getsockname()[1]
    sock.close()
    command = [sys.executable, "-m", "tgi_nb", "serve", "--model-id", str(model_path), "--port", str(port),
               "--max-concurrent-requests", "1024", "--log-level", "warning"]
    if args.dtype:
        command += ["--dtype", args.dtype]
    if args.device:
        command += ["--device", args.device]
    env = dict(os.environ)
    log(f"[http] starting: {' '.join(command)}")
    proc = subprocess.Popen(command, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        return asyncio.run(run_http_async(url, workload))
    finally:
        stop_process(proc, 30)


# ------------------------------------------------------------------------------------------------- report
def fmt_ms(stats: Optional[dict], key: str) -> str:
    return f"{stats[key] * 1000:.0f}" if stats else "-"


def table(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        row = [r["system"], f"{r['request_s']:.2f}", f"{r['output_tok_s']:.1f}", f"{r['total_tok_s']:.1f}"]
        for name in ("ttft", "tpot", "itl", "e2el"):
            s = r.get(name)
            row += [fmt_ms(s, "mean"), fmt_ms(s, "p50"), fmt_ms(s, "p99")]
        rows.append(row)
    return rows


HEADER = ["system", "req/s", "output tok/s", "total tok/s", "TTFT mean", "TTFT p50", "TTFT p99", "TPOT mean",
          "TPOT p50", "TPOT p99", "ITL mean", "ITL p50", "ITL p99", "E2EL mean", "E2EL p50", "E2EL p99"]


def main(argv: Optional[list[str]] = None) -> int:
    import torch

    from tgi_nb.engine import EngineConfig, LLMEngine
    from tgi_nb.engine.budget import choose_num_threads
    from tgi_nb.models import resolve_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser)
    parser.add_argument("--threads", type=int, default=None, help="engine intra-op threads (default: one per core)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    parser.add_argument("--server", choices=("process", "thread"), default="process",
                        help="run the HTTP server as `tgi-nb serve` in a child process (default) or in a thread "
                             "of this process, as in a notebook kernel")
    parser.add_argument("--json", type=Path, default=None, help="write the results to this file")
    parser.add_argument("--markdown", action="store_true", help="also print a markdown table")
    args = parser.parse_args(argv)
    if args.num_requests < 1:
        parser.error("--num-requests must be >= 1")

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.threads = args.threads or choose_num_threads().count
    resolved = resolve_model(args.model)
    model_path = Path(resolved.path)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    workload = make_workload(args.num_requests, args.min_prompt, args.max_prompt, args.min_output, args.max_output,
                             seed=args.seed, tokenizer=tokenizer)
    log(f"model {resolved.model_id} ({resolved.source}), {args.device} {args.dtype}, {args.threads} threads; "
        f"workload: {describe(workload)}")

    engine = LLMEngine(EngineConfig(model_id=str(model_path), device=args.device, dtype=args.dtype,
                                    num_threads=args.threads))
    try:
        run_engine(engine, make_workload(4, 16, 600, 4, 8, seed=args.seed + 1000, vocab_size=engine.vocab_size))
        log("[engine] running ...")
        in_process = run_engine(engine, workload)
        log(f"[engine] {in_process.wall_s:.1f} s, {in_process.output_tok_s:.1f} output tok/s")
    finally:
        engine.shutdown()
        del engine
    log(f"[http] running ({args.server}) ...")
    http = run_http(args, model_path, workload)
    log(f"[http] {http.wall_s:.1f} s, {http.output_tok_s:.1f} output tok/s, {len(http.errors)} errors")

    results = [in_process.summary(), http.summary()]
    ratio = http.output_tok_s / in_process.output_tok_s if in_process.output_tok_s else 0.0
    expected = sum(r.max_new_tokens for r in workload)
    ok = ratio >= TARGET_RATIO and not http.errors and http.output_tokens == expected
    machine = {"date": datetime.date.today().isoformat(), "platform": platform.platform(),
               "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "threads": args.threads, "torch": torch.__version__, "device": args.device, "dtype": args.dtype,
               "server": args.server}
    rows = table(results)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADER)]
    print(f"workload: {describe(workload)}; times in ms")
    print("  ".join(h.rjust(w) for h, w in zip(HEADER, widths)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    print(f"http / engine output tok/s: {ratio:.3f} (target >= {TARGET_RATIO}) {'OK' if ok else 'MISSED'}; "
          f"http output tokens {http.output_tokens} of {expected}, errors: {len(http.errors)}")
    if http.errors:
        print(f"first errors: {http.errors[:3]}")
    if args.markdown:
        print()
        print(f"Serving benchmark, {machine['date']}, {machine['processor']} ({machine['cpus']} CPUs, "
              f"{args.threads} threads), torch {machine['torch']}, {args.device} {args.dtype}, server: {args.server}. "
              f"Workload: {describe(workload)}. Times in ms.")
        print()
        print(markdown_table(HEADER, rows))
        print()
        print(f"HTTP / in-process output tok/s: **{ratio:.3f}** (target >= {TARGET_RATIO}).")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "workload": describe(workload), "results": results,
                                         "ratio": ratio, "target": TARGET_RATIO}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
