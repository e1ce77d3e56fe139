"""The benchmark workload shared by bench_engine.py (in-process) and bench_serve.py (HTTP).

A workload is a seeded list of requests whose prompt and output lengths are drawn uniformly from
[min_prompt, max_prompt] and [min_output, max_output], as ``vllm bench serve --dataset-name random`` does.
Outputs are meant to be generated with ``ignore_eos`` so every system produces exactly
``max_new_tokens`` tokens.

Prompt content, when a tokenizer is given: random *word tokens* — vocabulary entries that are a space
followed by 2+ lowercase ASCII letters (``Ġthe``, ``Ġchannels``; about 21k of SmolLM2's 49k tokens), never
special tokens. Under a GPT-2 style byte-level pre-tokenizer each such token is its own pre-token, so the
decoded text (``BenchRequest.prompt``, e.g. " channels casual empath contracts ...") encodes back to exactly
the same ids: the HTTP benchmark can send text and the server sees the prompt length the in-process
benchmark uses. ``make_workload`` checks this round trip and fails if it does not hold. The text is word
salad; with greedy decoding and ``ignore_eos`` the content does not change the work done.

Without a tokenizer, prompts are ids drawn uniformly from ``[0, vocab_size)`` minus ``exclude_ids``
(default: SmolLM2's added/special tokens 0-16) and ``prompt`` is None.

Every prompt starts with a different first block of tokens, so prefix caching finds nothing to reuse and
gives no system an advantage.

Example (from benchmarks/, or with the repository root on sys.path: ``from benchmarks.workload import ...``):
    >>> from workload import make_workload
    >>> from transformers import AutoTokenizer
    >>> tok = AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")   # doctest: +SKIP
    >>> w = make_workload(num_requests=2, min_prompt=4, max_prompt=4, tokenizer=tok)  # doctest: +SKIP
    >>> w[0].prompt, tok.encode(w[0].prompt) == w[0].prompt_token_ids                # doctest: +SKIP
    (' inspir achieve seism clogged', True)
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Iterable, Optional

SMOLLM2_VOCAB_SIZE = 49152
SMOLLM2_SPECIAL_IDS = range(17)  # <|endoftext|>, <|im_start|>, <|im_end|>, <repo_name>, ... (ids 0-16)
_WORD_TOKEN = re.compile(r"Ġ[a-z]{2,}")  # byte-level BPE spells a leading space as "Ġ"
_UNIQUE_PREFIX = 16  # tokens that must differ between prompts: one KV block at the default block size


@dataclass(slots=True, frozen=True)
class BenchRequest:
    """One request of a workload: prompt ids, the exact number of tokens to generate, and the prompt as
    text when the workload was built with a tokenizer (``encode(prompt) == prompt_token_ids``)."""

    prompt_token_ids: list[int]
    max_new_tokens: int
    prompt: Optional[str] = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def word_token_pool(tokenizer) -> list[int]:
    """Ids of the tokenizer's "space + lowercase word" tokens that encode back to themselves."""
    special = set(tokenizer.all_special_ids)
    pool = sorted(i for s, i in tokenizer.get_vocab().items() if _WORD_TOKEN.fullmatch(s) and i not in special)
    if len(pool) < 1000:
        raise ValueError(f"tokenizer: only {len(pool)} word tokens of the form 'Ġword' found; "
                         f"pass tokenizer=None to use random ids instead")
    return pool


def make_workload(num_requests: int = 64, min_prompt: int = 16, max_prompt: int = 512, min_output: int = 16,
                  max_output: int = 256, seed: int = 0, vocab_size: int = SMOLLM2_VOCAB_SIZE, tokenizer=None,
                  exclude_ids: Iterable[int] = SMOLLM2_SPECIAL_IDS) -> list[BenchRequest]:
    """A reproducible list of ``num_requests`` requests (same seed, same workload on every machine).

    Example:
        >>> w = make_workload(num_requests=2, min_prompt=4, max_prompt=4, min_output=3, max_output=3)
        >>> [(r.prompt_len, r.max_new_tokens, r.prompt) for r in w]
        [(4, 3, None), (4, 3, None)]
    """
    if num_requests < 1:
        raise ValueError(f"num_requests: must be >= 1, got {num_requests}")
    if not 1 <= min_prompt <= max_prompt:
        raise ValueError(f"min_prompt/max_prompt: need 1 <= min_prompt <= max_prompt, got {min_prompt}, {max_prompt}")
    if not 1 <= min_output <= max_output:
        raise ValueError(f"min_output/max_output: need 1 <= min_output <= max_output, got {min_output}, {max_output}")
    rng = random.Random(seed)
    if tokenizer is not None:
        pool = word_token_pool(tokenizer)
    else:
        excluded = set(exclude_ids)
        pool = [i for i in range(vocab_size) if i not in excluded]
    # lengths first, so that the same seed gives the same lengths whichever way the content is drawn
    lengths = [(rng.randint(min_prompt, max_prompt), rng.randint(min_output, max_output))
               for _ in range(num_requests)]
    requests: list[BenchRequest] = []
    seen_prefixes: set[tuple[int, ...]] = set()
    for prompt_len, output_len in lengths:
        while True:
            ids = [rng.choice(pool) for _ in range(prompt_len)]
            prefix = tuple(ids[:_UNIQUE_PREFIX])
            if prefix not in seen_prefixes:
                seen_prefixes.add(prefix)
                break
        text = None
        if tokenizer is not None:
            text = tokenizer.decode(ids)
            if tokenizer.encode(text, add_special_tokens=False) != ids:
                raise ValueError("tokenizer: decoded word tokens do not encode back to the same ids "
                                 "(not a byte-level BPE tokenizer?); pass tokenizer=None")
        requests.append(BenchRequest(ids, output_len, text))
    return requests


def log(message: str) -> None:
    """Progress to stderr, so that stdout holds only the results."""
    print(message, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation, as numpy's default.

    Example:
        >>> percentile([1.0, 2.0, 3.0, 4.0], 50)
        2.5
    """
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def add_workload_arguments(parser) -> None:
    """The workload's command-line options (model, request count, length ranges, seed), the same in every
    benchmark that runs it.

    Example:
        >>> import argparse
        >>> parser = argparse.ArgumentParser(); add_workload_arguments(parser)
        >>> parser.parse_args(["--num-requests", "8"]).num_requests
        8
    """
    parser.add_argument("--model", default=None, help="model id or folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--min-prompt", type=int, default=16)
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--min-output", type=int, default=16)
    parser.add_argument("--max-output", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)


def describe(workload: list[BenchRequest]) -> str:
    """One line summing up a workload's sizes.

    Example:
        >>> describe(make_workload(num_requests=2, min_prompt=4, max_prompt=4, min_output=3, max_output=3))
        '2 requests, prompts 4-4 tokens (8 in all), outputs 3-3 tokens (6 in all)'
    """
    p = [r.prompt_len for r in workload]
    o = [r.max_new_tokens for r in workload]
    return (f"{len(workload)} requests, prompts {min(p)}-{max(p)} tokens ({sum(p)} in all), "
            f"outputs {min(o)}-{max(o)} tokens ({sum(o)} in all)")


def wait_healthy(url: str, proc: Optional["subprocess.Popen"] = None, timeout: float = 600) -> None:
    """Return once ``url``/health answers 200; raise if ``proc`` (the server) exits or ``timeout`` passes."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} was not healthy within {timeout}s")


def stop_process(proc: "subprocess.Popen", timeout: float = 30) -> None:
    """Terminate a server started by a benchmark, then kill it if it has not exited within ``timeout`` s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class StreamedCompletion:
    """One streamed ``/v1/completions`` request as a benchmark sees it: when each text chunk arrived
    (``time.perf_counter()``), the server's completion token count (None without a usage chunk), or an error."""

    stamps: list[float]
    completion_tokens: Optional[int] = None
    error: Optional[str] = None


async def stream_completion(client, prompt: str, max_tokens: int) -> StreamedCompletion:
    """POST a greedy, ``ignore_eos`` streaming completion through an ``httpx.AsyncClient`` on the server's base
    URL and time its chunks; every failure (HTTP status, an SSE error event, a dropped connection, no text at
    all) comes back as ``error`` so the other requests of a benchmark go on."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    result = StreamedCompletion(stamps=[])
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"{response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line[6:].strip() == "[DONE]":
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = str(chunk["error"])[:200]
                    return result
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    result.stamps.append(time.perf_counter())
                if chunk.get("usage"):
                    result.completion_tokens = chunk["usage"].get("completion_tokens")
    except Exception as exc:  # noqa: BLE001 - reported by the caller; the other streams go on
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    if not result.stamps:
        result.error = "no tokens"
    return result


def markdown_table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    """A GitHub markdown table, as docs/benchmarks.md holds them.

    >>> print(markdown_table(["system", "tok/s"], [["tgi_nb", "82.3"]]))
    | system | tok/s |
    |---|---|
    | tgi_nb | 82.3 |
    """
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
