"""Soak: 1,000 requests in a row against ``tgi-nb serve`` in a child process, a deterministic mix of every kind a
client sends (chat and completions, OpenAI and TGI routes, streamed, aborted mid-stream, invalid), then the
server's memory and KV cache.

    PYTHONPATH=$PWD python tests/soak.py                        # a tiny random llama (built here), ~minutes
    PYTHONPATH=$PWD python tests/soak.py --model-id smollm2      # the bundled SmolLM2-135M-Instruct (slower)

The model only has to produce tokens: leaks live in the server, the engine's bookkeeping and the KV cache, which
are the same for the tiny model (SmolLM2's tokenizer and chat template) and the real one.

Checks, each reported: no 5xx (and no error event of the server's own making in a stream), every invalid request
a 4xx, after the run every KV block free (/metrics: tgi_kv_blocks_used == 0) and the server's resident memory
(VmRSS of the child) flat: measured after a warm-up of ``--warmup`` requests (allocator pools and caches fill
in the first requests) and again at the end; growth above ``--max-rss-growth-mib`` fails the run.
Exit code 0 when every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from workload import stop_process, wait_healthy  # noqa: E402  (benchmarks/workload.py: one health wait for every script)

CHAT = "/v1/chat/completions"
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Count to five.",
             "Translate 'good morning' to Spanish.", "Name three colors.", "Qu'est-ce qu'un chat ? 猫 😀"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (Linux /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) / 1024


def kv_blocks_used(http: httpx.Client) -> float:
    """The server's KV blocks in use, from /metrics."""
    text = http.get("/metrics").text
    return float(re.search(r"^tgi_kv_blocks_used (\S+)$", text, re.M).group(1))


def _chat(rng: random.Random, **extra) -> dict:
    return {"messages": [{"role": "user", "content": rng.choice(QUESTIONS)}], "max_tokens": rng.randint(1, 12),
            "temperature": rng.choice([0, 0.7]), "seed": rng.randint(0, 99), **extra}


def _read_stream(http: httpx.Client, path: str, body: dict, abort_after: int = 0) -> tuple[int, list[str]]:
    """POST a streaming request; read all of it, or close the connection after ``abort_after`` events."""
    with http.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, [r.text]
        events = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if abort_after and len(events) >= abort_after:
                    break  # leaving the block closes the connection mid-stream: the server must abort
        return 200, events


# Each kind: (name, share of the mix, function returning (status, events) for one request, expected status class).
def request_kinds() -> list[tuple[str, int, Callable[[httpx.Client, random.Random], tuple[int, list[str]]], int]]:
    def chat(http, rng):
        r = http.post(CHAT, json=_chat(rng))
        return r.status_code, []

    def chat_stream(http, rng):
        return _read_stream(http, CHAT, _chat(rng, stream=True, stream_options={"include_usage": True}))

    def chat_aborted(http, rng):
        return _read_stream(http, CHAT, _chat(rng, stream=True, max_tokens=64), abort_after=rng.randint(1, 3))

    def completion(http, rng):
        r = http.post("/v1/completions", json={"prompt": rng.choice(QUESTIONS), "max_tokens": rng.randint(1, 12),
                                                "n": rng.choice([1, 2]), "logprobs": rng.choice([None, 2])})
        return r.status_code, []

    def completion_aborted(http, rng):
        return _read_stream(http, "/v1/completions", {"prompt": rng.choice(QUESTIONS), "max_tokens": 64,
                                                      "stream": True}, abort_after=1)

    def generate(http, rng):
        r = http.post("/generate", json={"inputs": rng.choice(QUESTIONS),
                                         "parameters": {"max_new_tokens": rng.randint(1, 12), "details": True}})
        return r.status_code, []

    def generate_stream(http, rng):
        return _read_stream(http, "/generate_stream", {"inputs": rng.choice(QUESTIONS),
                                                       "parameters": {"max_new_tokens": rng.randint(1, 12)}})

    def invalid(http, rng):
        bad = rng.choice([
            {"messages": [{"role": "user", "content": "\ud800"}]},           # a lone surrogate
            {"messages": [{"role": "bot", "content": "x"}]},                  # a role no one knows
            {"messages": [{"role": "user", "content": "x"}], "temperature": 7},
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9},
            {"messages": [{"role": "user", "content": "x" * 50000}]},         # longer than the context
            {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}},
            {"messages": []},
        ])
        r = http.post(CHAT, content=json.dumps(bad), headers={"content-type": "application/json"})
        return r.status_code, []

    def invalid_tgi(http, rng):
        r = http.post("/generate", json=rng.choice([{"inputs": ""}, {"inputs": "x", "parameters": {"top_n_tokens": 99}},
                                                    {"inputs": 5}]))
        return r.status_code, []

    return [("chat", 20, chat, 2), ("chat_stream", 15, chat_stream, 2), ("chat_aborted", 10, chat_aborted, 2),
            ("completion", 10, completion, 2), ("completion_aborted", 5, completion_aborted, 2),
            ("generate", 10, generate, 2), ("generate_stream", 10, generate_stream, 2),
            ("invalid", 15, invalid, 4), ("invalid_tgi", 5, invalid_tgi, 4)]


def _server_failure_in(events: list[str]) -> bool:
    for data in events:
        if data.startswith("{") and '"error"' in data:
            body = json.loads(data)
            kind = body["error"].get("type") if isinstance(body["error"], dict) else body.get("error_type")
            if kind in ("server_error", "incomplete_generation", "generation"):
                return True
    return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50, help="requests before the first RSS reading")
    parser.add_argument("--model-id", default=None,
                        help="a model for tgi-nb serve ('smollm2': the bundled one); default: a tiny random llama")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-rss-growth-mib", type=float, default=64.0)
    args = parser.parse_args(argv)

    import tempfile

    from tgi_nb.server.runner import bind_socket

    tmp = tempfile.TemporaryDirectory()
    model_id = args.model_id
    if model_id is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from conftest import build_tiny_model

        model_id = str(build_tiny_model(Path(tmp.name)))
    sock = bind_socket(port=0)
    port = sock.getsockname()[1]
    sock.close()
    command = [sys.executable, "-m", "tgi_nb", "serve", "--port", str(port), "--log-level", "error",
               "--max-total-tokens", "1024"]
    if model_id != "smollm2":
        command += ["--model-id", model_id]
    log(f"starting: {' '.join(command)}")
    proc = subprocess.Popen(command, env=dict(os.environ))
    rng = random.Random(args.seed)
    kinds = request_kinds()
    weights = [k[1] for k in kinds]
    counts: Counter = Counter()
    failures: list[str] = []
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        rss_start = rss_mib(proc.pid)
        rss_warm = None
        started = time.perf_counter()
        with httpx.Client(base_url=url, timeout=120) as http:
            for i in range(args.requests):
                if i == args.warmup:
                    rss_warm = rss_mib(proc.pid)
                name, _, send, expected = rng.choices(kinds, weights)[0]
                status, events = send(http, rng)
                counts[(name, status)] += 1
                if status >= 500 or status // 100 != expected or _server_failure_in(events):
                    failures.append(f"request {i} ({name}): {status} {events[-1:] if events else ''}")
                if (i + 1) % 100 == 0:
                    log(f"{i + 1} requests, {time.perf_counter() - started:.0f}s, RSS {rss_mib(proc.pid):.1f} MiB")
            elapsed = time.perf_counter() - started
            # Aborts reach the engine through its inbox: give its loop a moment to catch up, then read the gauge.
            deadline = time.monotonic() + 60
            while kv_blocks_used(http) and time.monotonic() < deadline:
                time.sleep(0.2)
            kv_used = kv_blocks_used(http)
            still_ok = http.post(CHAT, json={"messages": [{"role": "user", "content": "Hi"}],
                                             "max_tokens": 4}).status_code
        rss_end = rss_mib(proc.pid)
    finally:
        stop_process(proc, 30)
        tmp.cleanup()

    rss_warm = rss_warm if rss_warm is not None else rss_start
    growth = rss_end - rss_warm
    print(f"{args.requests} requests in {elapsed:.0f}s ({args.requests / elapsed:.1f}/s)")
    for (name, status), n in sorted(counts.items()):
        print(f"  {name:20} {status}: {n}")
    print(f"RSS: {rss_start:.1f} MiB at start, {rss_warm:.1f} MiB after {args.warmup} requests, {rss_end:.1f} MiB "
          f"after {args.requests} ({growth:+.1f} MiB since the warm-up)")
    print(f"KV blocks in use after the run: {kv_used:.0f}; a normal request afterwards: {still_ok}")
    for failure in failures[:20]:
        print("FAILED:", failure)
    ok = not failures and kv_used == 0 and still_ok == 200 and growth <= args.max_rss_growth_mib
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
