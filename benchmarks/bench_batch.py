"""What the Batch API's lower priority buys: interactive time to first token while a batch fills the engine.

    .venv/bin/python benchmarks/bench_batch.py                   # SmolLM2-135M (bundled), 64 lines, needs the machine
    .venv/bin/python benchmarks/bench_batch.py --lines 8 --interactive 2 --max-tokens 8      # smoke test

One server in this process (ServerThread) on one engine whose running batch is capped (``--max-batch-size``, 16)
below the batch lines in flight (``--batch-concurrency``, 32), so that requests queue. Three runs, one after the
other, each sending ``--interactive`` streamed chat requests one after another (greedy, 16 tokens) through the
official openai client:

- ``alone``: no batch;
- ``batch, low priority``: while a batch of ``--lines`` chat lines (``--max-tokens`` each, ``ignore_eos``) runs,
  its lines at the Batch API's priority (interactive requests are admitted first);
- ``batch, same priority``: the same batch with its lines at the interactive priority (arrival order).

Reported: the TTFT p50 / max of the interactive requests answered while the batch still ran (and how many
were), and the batch's output tok/s (from its ``usage``) and wall time. The ratio that carries over between
machines is the TTFT with a batch over the TTFT alone, low priority against same.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from openai import OpenAI  # noqa: E402

from tgi_nb.engine import EngineConfig, LLMEngine  # noqa: E402
from tgi_nb.server import ServerSettings, ServerThread, build_app  # noqa: E402
from tgi_nb.server import batch_runner  # noqa: E402
from tgi_nb.server.priority import BATCH_PRIORITY, INTERACTIVE_PRIORITY  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name three colours.", "What is a KV cache?", "Say hello."]


def ttft(client: OpenAI, question: str) -> float:
    """Seconds from sending a streamed chat request to its first content."""
    started = time.perf_counter()
    stream = client.chat.completions.create(model="tgi", messages=[{"role": "user", "content": question}],
                                            max_tokens=16, temperature=0, stream=True)
    first = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
    return first if first is not None else time.perf_counter() - started


def run(client: OpenAI, args: argparse.Namespace, name: str, priority: int | None) -> dict:
    """One scenario: interactive TTFTs, with a batch at ``priority`` running meanwhile (None: no batch)."""
    batch = None
    started = time.perf_counter()
    if priority is not None:
        batch_runner.BATCH_PRIORITY = priority  # the runner reads it for each line
        lines = [json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
            "model": "tgi", "messages": [{"role": "user", "content": f"[{name} {i}] Write a story."}],
            "max_tokens": args.max_tokens, "ignore_eos": True, "temperature": 0}}) for i in range(args.lines)]
        uploaded = client.files.create(file=("lines.jsonl", "\n".join(lines).encode()), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        while client.batches.retrieve(batch.id).request_counts.completed == 0:  # the engine is busy with it now
            time.sleep(0.05)
    # Each scenario's own prompts (the name first): none finds another's in the prefix cache. Only the requests
    # answered while the batch still ran count (with a batch).
    times = []
    for i in range(args.interactive):
        took = ttft(client, f"[{name} {i}] {QUESTIONS[i % len(QUESTIONS)]}")
        if batch is None or client.batches.retrieve(batch.id).status == "in_progress":
            times.append(took)
        else:
            break
    result = {"interactive": len(times), "ttft_p50_s": round(statistics.median(times), 3),
              "ttft_max_s": round(max(times), 3)}
    if batch is not None:
        while (done := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "cancelled"):
            time.sleep(0.05)
        wall = time.perf_counter() - started  # to the first poll that saw it done
        result.update(batch_output_tok_s=round(done.usage.output_tokens / wall, 1), batch_wall_s=round(wall, 1),
                      batch_completed=done.request_counts.completed)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-id", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--lines", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--interactive", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-concurrency", type=int, default=32)
    args = parser.parse_args(argv)

    engine = LLMEngine(EngineConfig(max_num_seqs=args.max_batch_size,
                                    **({"model_id": args.model_id} if args.model_id else {})))
    app = build_app(engine, ServerSettings(batch_concurrency=args.batch_concurrency, embedding_model=None))
    results = {}
    try:
        with ServerThread(app, port=0) as server:
            client = OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
            ttft(client, "Warm up.")
            for name, priority in (("alone", None), ("batch, low priority", BATCH_PRIORITY),
                                   ("batch, same priority", INTERACTIVE_PRIORITY)):
                results[name] = run(client, args, name, priority)
                print(f"{name}: {results[name]}", flush=True)
    finally:
        batch_runner.BATCH_PRIORITY = BATCH_PRIORITY
        engine.shutdown()
    alone = results["alone"]["ttft_p50_s"]
    for name in ("batch, low priority", "batch, same priority"):
        print(f"{name}: interactive TTFT p50 {results[name]['ttft_p50_s'] / alone:.2f}x alone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
