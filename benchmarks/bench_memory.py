"""Resident memory of the default server and the default notebook endpoint, next to llama.cpp's llama-server.

    .venv/bin/python benchmarks/bench_memory.py --markdown                         # this checkout, llama-server
    .venv/bin/python benchmarks/bench_memory.py --reference /tmp/main-ref --markdown   # and another checkout's code
    .venv/bin/python benchmarks/bench_memory.py --num-requests 4 --max-output 8 --skip endpoint,llama   # smoke test

Each system runs in a child process, one after the other, with the default model (SmolLM2-135M-Instruct, the
bundled copy offline) and default settings. VmRSS and VmHWM come from the child's /proc/<pid>/status:

- idle: once /health answers 200, before any request;
- after one chat: one non-streamed chat completion ("What is the capital of France?", 32 tokens);
- after 32 streams: the streaming workload (benchmarks/workload.py's prompts of 16-512 tokens, outputs of
  16-128 tokens by default, greedy, ``ignore_eos``, all at t=0, one streaming ``/v1/completions`` client each);
  its wall time and output tok/s are reported too.

Systems:

- ``serve``: ``tgi-nb serve`` of this checkout.
- ``reference``: ``tgi-nb serve`` with ``--reference PATH`` on PYTHONPATH (e.g. ``git worktree add --detach
  /tmp/main-ref main``): the same workload on other code, in the same run, for the slowdown ratio.
- ``endpoint``: a Python process that does what a notebook cell does, ``create_inference_endpoint(...)`` with
  huggingface_hub's arguments and ``wait()``: the server runs in a thread of that process, as in a kernel.
- ``budget``: ``tgi-nb serve`` with a 2 GiB cgroup-style budget injected (``TGI_NB_CGROUP_ROOT`` pointing at a
  folder whose ``memory.max`` is 2 GiB), 8 concurrent chats instead of 32 streams; its peak must stay below it.
- ``llama``: ``llama-server`` (benchmarks/llama_server.py) on the bundled GGUF with the same capacity as ``serve``
  (``-c`` = its ``max_batch_total_tokens``, ``-np 32``).

The machine's CPU model, flags and load average are printed with the results: other sessions may load it, and a
ratio within one run is the figure that carries over.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_serve import ServeResult, _one  # noqa: E402
from workload import (BenchRequest, describe, log, make_workload, markdown_table, stop_process,  # noqa: E402
                      wait_healthy)

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30
BUDGET_BYTES = 2 * GIB
IDLE_TARGET = 1.2e9   # bytes: the target for the default server with float32 weights
SLOWDOWN_LIMIT = 0.95  # this checkout's 32-stream output tok/s over the reference's

ENDPOINT_SCRIPT = """
import sys
from tgi_nb import create_inference_endpoint
endpoint = create_inference_endpoint("bench-memory", repository="HuggingFaceTB/SmolLM2-135M-Instruct",
                                     framework="pytorch", task="text-generation", accelerator="cpu", type="public")
endpoint.wait(timeout=900)
print(endpoint.url, flush=True)
sys.stdin.read()   # serve until the benchmark closes stdin
endpoint.delete()
"""


@dataclass
class MemoryResult:
    """One system's resident memory (bytes) at each phase, and its streaming workload's speed."""

    system: str
    rss: dict[str, int] = field(default_factory=dict)
    hwm: dict[str, int] = field(default_factory=dict)
    streams: Optional[ServeResult] = None
    notes: list[str] = field(default_factory=list)


def proc_status(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in bytes."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


def record(result: MemoryResult, pid: int, phase: str) -> None:
    rss, hwm = proc_status(pid)
    result.rss[phase], result.hwm[phase] = rss, hwm
    log(f"[{result.system}] {phase}: VmRSS {rss / 1e6:.0f} MB, VmHWM {hwm / 1e6:.0f} MB")


def one_chat(url: str) -> None:
    import httpx

    r = httpx.post(url + "/v1/chat/completions", timeout=600, json={
        "model": "bench", "max_tokens": 32, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    r.raise_for_status()


async def _streams(url: str, workload: list[BenchRequest]) -> ServeResult:
    import httpx

    limits = httpx.Limits(max_connections=len(workload) + 4, max_keepalive_connections=len(workload) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(None), limits=limits) as client:
        result = ServeResult("streams", len(workload), sum(r.prompt_len for r in workload))
        t0 = time.perf_counter()
        await asyncio.gather(*(_one(client, i, r, t0, result) for i, r in enumerate(workload)))
        result.wall_s = time.perf_counter() - t0
    return result


def concurrent_chats(url: str, count: int) -> list[str]:
    """``count`` chats at once through the openai client; their finish reasons."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)

    def chat(i: int) -> str:
        reply = client.chat.completions.create(model="bench", max_tokens=64, temperature=0, messages=[
            {"role": "user", "content": f"Give me tip number {i} for writing clear Python code."}])
        return reply.choices[0].finish_reason

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(chat, range(count)))


def measure(result: MemoryResult, pid: int, url: str, workload: Optional[list[BenchRequest]],
            chats: int = 0) -> None:
    record(result, pid, "idle")
    one_chat(url)
    record(result, pid, "one chat")
    if workload is not None:
        result.streams = asyncio.run(_streams(url, workload))
        log(f"[{result.system}] {len(workload)} streams: {result.streams.wall_s:.1f} s, "
            f"{result.streams.output_tok_s:.1f} output tok/s, {len(result.streams.errors)} errors")
        record(result, pid, f"{len(workload)} streams")
    if chats:
        reasons = concurrent_chats(url, chats)
        result.notes.append(f"{chats} concurrent chats finished: {sorted(set(reasons))}")
        record(result, pid, f"{chats} chats")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_serve(system: str, pythonpath: Path, workload: Optional[list[BenchRequest]], *, chats: int = 0,
              extra_env: Optional[dict] = None) -> tuple[MemoryResult, dict]:
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "HF_HUB_OFFLINE": "1", **(extra_env or {})}
    command = [sys.executable, "-m", "tgi_nb", "serve", "--port", str(port), "--log-level", "warning"]
    log(f"[{system}] starting: PYTHONPATH={pythonpath} {' '.join(command[1:])}")
    proc = subprocess.Popen(command, env=env, cwd=pythonpath)
    result = MemoryResult(system)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, timeout=900)
        info = httpx.get(url + "/info").json()
        measure(result, proc.pid, url, workload, chats)
        return result, info
    finally:
        stop_process(proc, 60)


def run_endpoint(workload: Optional[list[BenchRequest]]) -> MemoryResult:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_TOKEN", None)
    log("[endpoint] starting: create_inference_endpoint(...) in a child Python process")
    proc = subprocess.Popen([sys.executable, "-c", ENDPOINT_SCRIPT], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    result = MemoryResult("endpoint")
    try:
        url = proc.stdout.readline().strip()
        if not url.startswith("http"):
            raise RuntimeError(f"the endpoint process printed {url!r} and exited with {proc.poll()}")
        measure(result, proc.pid, url, workload)
        return result
    finally:
        proc.stdin.close()
        stop_process(proc, 60)


def run_llama(capacity: int, parallel: int, workload: Optional[list[BenchRequest]], threads: int
              ) -> Optional[MemoryResult]:
    from llama_server import find_llama_server

    from tgi_nb.models.loader import bundled_gguf_path

    binary, gguf = find_llama_server(log=log), bundled_gguf_path()
    if binary is None or gguf is None:
        log(f"[llama] skipped: llama-server {binary!r}, GGUF {gguf!r}")
        return None
    port = free_port()
    command = [binary, "-m", str(gguf), "--port", str(port), "-c", str(capacity), "-np", str(parallel),
               "-t", str(threads), "--no-repack", "--log-disable"]
    log(f"[llama] starting: {' '.join(command)}")
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = MemoryResult("llama-server")
    result.notes.append(f"-c {capacity} -np {parallel} (the same KV capacity as serve), Q4_1 weights")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, timeout=300)
        measure(result, proc.pid, url, workload)
        return result
    finally:
        stop_process(proc, 60)


def fake_cgroup(root: Path, limit: int) -> Path:
    """A cgroup v2 folder with ``memory.max`` = ``limit`` and no ``memory.current``: the engine then counts its
    own VmRSS as the container's usage (a container that holds only the server)."""
    (root / "cgroup.controllers").write_text("cpu memory\n")
    (root / "memory.max").write_text(f"{limit}\n")
    return root


def machine() -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key in ("Model name", "CPU(s)", "Flags"):
                info[key] = value.strip()
    except OSError:
        pass
    info["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
    return info


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, default=None,
                        help="another checkout (e.g. main's) whose `tgi-nb serve` runs the same workload")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--max-output", type=int, default=128)
    parser.add_argument("--skip", default="", help="comma-separated systems to leave out: "
                                                   "serve, reference, endpoint, budget, llama")
    parser.add_argument("--markdown", action="store_true", help="also print a table for docs/benchmarks.md")
    args = parser.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    from transformers import AutoTokenizer

    from tgi_nb.engine.budget import choose_num_threads
    from tgi_nb.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model().path)
    workload = make_workload(args.num_requests, min(16, args.max_prompt), args.max_prompt, min(16, args.max_output),
                             args.max_output, seed=0, tokenizer=tokenizer)
    log(f"workload: {describe(workload)}")
    streams_phase = f"{args.num_requests} streams"
    results: list[MemoryResult] = []
    info: dict = {}
    if "serve" not in skip:
        serve, info = run_serve("serve", REPO, workload)
        results.append(serve)
    if args.reference is not None and "reference" not in skip:
        reference, _ = run_serve("reference", args.reference.resolve(), workload)
        results.append(reference)
    if "endpoint" not in skip:
        results.append(run_endpoint(workload))
    if "budget" not in skip:
        with tempfile.TemporaryDirectory() as tmp:
            budget, budget_info = run_serve("budget 2 GiB", REPO, None, chats=8,
                                            extra_env={"TGI_NB_CGROUP_ROOT": str(fake_cgroup(Path(tmp), BUDGET_BYTES))})
        budget.notes.append(f"max_batch_total_tokens {budget_info.get('max_batch_total_tokens')}, KV cache "
                            f"{(budget_info.get('kv_cache_bytes') or 0) / 1e6:.0f} MB")
        results.append(budget)
    if "llama" not in skip:
        capacity = info.get("max_batch_total_tokens") or 32768
        llama = run_llama(capacity, args.num_requests, workload, choose_num_threads().count)
        if llama is not None:
            results.append(llama)

    phases = ("idle", "one chat", streams_phase, "8 chats")
    header = ["system"] + [f"{p} RSS / HWM (MB)" for p in phases] + ["streams wall s", "output tok/s"]
    rows = []
    for r in results:
        cells = [r.system]
        for p in phases:
            cells.append(f"{r.rss[p] / 1e6:.0f} / {r.hwm[p] / 1e6:.0f}" if p in r.rss else "-")
        s = r.streams
        cells += [f"{s.wall_s:.1f}" if s else "-", f"{s.output_tok_s:.1f}" if s else "-"]
        rows.append(cells)
    m = machine()
    print(f"{m['date']}; {m.get('Model name')} ({m.get('CPU(s)')} CPUs); load average {' '.join(m['loadavg'])}")
    print(f"workload: {describe(workload)}")
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)] if rows else []
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    checks = []
    by_name = {r.system: r for r in results}
    if "serve" in by_name:
        idle = by_name["serve"].rss["idle"]
        checks.append(f"serve idle VmRSS {idle / 1e9:.2f} GB (target <= {IDLE_TARGET / 1e9:.1f}): "
                      f"{'met' if idle <= IDLE_TARGET else 'MISSED'}")
    if "serve" in by_name and "reference" in by_name and by_name["reference"].streams.output_tok_s:
        ratio = by_name["serve"].streams.output_tok_s / by_name["reference"].streams.output_tok_s
        checks.append(f"serve / reference {streams_phase} output tok/s {ratio:.3f} (target >= {SLOWDOWN_LIMIT}): "
                      f"{'met' if ratio >= SLOWDOWN_LIMIT else 'MISSED'}")
    if "budget 2 GiB" in by_name:
        peak = max(by_name["budget 2 GiB"].hwm.values())
        checks.append(f"2 GiB budget: peak VmHWM {peak / 2**30:.2f} GiB: {'met' if peak < BUDGET_BYTES else 'MISSED'}")
    for r in results:
        for note in r.notes:
            checks.append(f"{r.system}: {note}")
        if r.streams and r.streams.errors:
            checks.append(f"{r.system}: {len(r.streams.errors)} stream errors, first {r.streams.errors[0]}")
    for line in checks:
        print(line)
    if args.markdown:
        print()
        print(markdown_table(header, rows))
        print()
        print(f"CPU flags: {m.get('Flags')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
