"""The GPU path, checked and measured in one command, on random-weight models built from the bundled files.

    .venv/bin/python benchmarks/gpu_check.py                      # one CUDA GPU: about 6 minutes on an H100 / H200
    .venv/bin/python benchmarks/gpu_check.py --device cpu --smoke # the same code on the CPU, a tiny model (the suite)

No network: two Llama folders are written with random weights (transformers' initialisation) and the bundled
SmolLM2 tokenizer: ``135m`` (SmolLM2-135M's config.json as bundled) and ``1.7b`` (hidden 2048, 24 layers, 32 heads,
intermediate 8192: SmolLM2-1.7B's shape); ``--smoke`` builds one tiny model (hidden 64, 2 layers) instead. Then:

1. kernels: the Triton paged attention on the device against the float64 reference (a mixed decode + prefill
   step, float32 / float16 / bfloat16 where the GPU has it), and the device sampler's greedy tokens against
   the CPU sampler's.
2. correctness, per model: float32 greedy tokens of tgi_nb equal transformers ``generate`` (6 prompts x 32
   tokens, each prompt alone and all six batched), and the agreement in bfloat16 (float16 on GPUs without it).
   On the CPU the engine runs its GPU path too (``TGI_NB_GPU_PATH=1``, Triton interpreted; float16 for the
   half-precision check).
3. throughput on the largest model: bench_engine.py's workload (64 requests at t=0, prompts 16-512, outputs
   16-256, greedy, ``ignore_eos``) through tgi_nb, transformers ``generate_batch`` and padded ``generate``.
4. single-stream decode (32-token prompt, 256 tokens) against the HBM ceiling (measured bandwidth / bytes read
   per token).
5. HTTP streaming (the server in a thread of this process, as in a notebook) at 1, 16 and 64 concurrent streams
   against the same engine in process.
6. GPU busy share: the share of the 64-request run's wall time during which a GPU kernel runs
   (``torch.profiler``; on the CPU, the process's CPU time over wall time x threads).

It prints one markdown table (check, value, target, verdict); exit status 1 if a correctness check failed.
The performance targets are issue 18's, on an H200 with the 1.7B shape in bfloat16.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

if not torch.cuda.is_available():   # Triton only runs interpreted without a GPU; set before anything imports it
    os.environ.setdefault("TRITON_INTERPRET", "1")

import bench_engine  # noqa: E402
import bench_serve  # noqa: E402
from workload import describe, log, make_workload  # noqa: E402

SHAPES = {
    "135m": {},
    "1.7b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                 intermediate_size=8192),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=128),
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                    "chat_template.jinja", "generation_config.json")


class Report:
    """Rows of the final table: (check, value, target, verdict)."""

    def __init__(self):
        self.rows: list[tuple[str, str, str, str]] = []
        self.failed = False

    def add(self, check: str, value: str, target: str = "", ok: Optional[bool] = None, hard: bool = False) -> None:
        verdict = "" if ok is None else ("pass" if ok else "FAIL" if hard else "below target")
        self.failed |= hard and ok is False
        self.rows.append((check, value, target, verdict))
        log(f"[gpu_check] {check}: {value} {verdict}")

    def markdown(self) -> str:
        lines = ["| check | value | target | verdict |", "|---|---|---|---|"]
        lines += [f"| {' | '.join(c.replace('|', '/') for c in row)} |" for row in self.rows]
        return "\n".join(lines)


def build_model(out: Path, shape: str, device: torch.device) -> Path:
    """A random-weight Llama in SmolLM2's tokenizer and config, with ``SHAPES[shape]`` applied; float32 weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tgi_nb.models import resolve_model

    bundled = Path(resolve_model().path)
    config = AutoConfig.from_pretrained(bundled)
    for key, value in SHAPES[shape].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    with torch.device(device):   # initialised where it will run: 1.7B on a CPU takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    for name in _TOKENIZER_FILES:
        if (bundled / name).is_file():
            shutil.copy2(bundled / name, out / name)
    del model
    bench_engine.free_memory()
    return out


# ------------------------------------------------------------------------------------------------ kernels
def check_kernels(report: Report, device: torch.device, half: torch.dtype) -> None:
    from tgi_nb.engine.device_sampler import DeviceSampler
    from tgi_nb.engine.sampler import sample
    from tgi_nb.engine.sampling_params import SamplingParams
    from tgi_nb.engine.sequence import Request, Sequence
    from tgi_nb.models.attention import paged_decode_attention_reference
    from tgi_nb.models.triton_attention import paged_attention

    chunks = [(37, 1), (0, 1), (15, 1), (0, 23), (40, 9)]     # (cached tokens, query tokens): decodes, prefills
    g = torch.Generator().manual_seed(0)
    bs, heads, kv_heads, dim = 16, 8, 2, 64
    need = [-(-(c + n) // bs) for c, n in chunks]
    tables = torch.zeros(len(chunks), max(need), dtype=torch.int32)
    perm, used = torch.randperm(sum(need), generator=g), 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[used:used + n]
        used += n
    k = torch.randn(sum(need), bs, kv_heads, dim, generator=g, dtype=torch.float64)
    v = torch.randn(sum(need), bs, kv_heads, dim, generator=g, dtype=torch.float64)
    q = torch.randn(sum(n for _, n in chunks), heads, dim, generator=g, dtype=torch.float64)
    lens = torch.tensor([c + n for c, n in chunks], dtype=torch.int32)
    starts = torch.tensor([0] + [n for _, n in chunks]).cumsum(0).to(torch.int32)
    rows = [i for i, (_, n) in enumerate(chunks) for _ in range(n)]
    ctx = [c + j + 1 for c, n in chunks for j in range(n)]
    ref = paged_decode_attention_reference(q, k, v, tables[rows], torch.tensor(ctx), dim ** -0.5)
    for dtype, tol in ((torch.float32, 1e-4), (half, 3e-2)):
        t0 = time.perf_counter()
        out = paged_attention(*(x.to(device, dtype) for x in (q, k, v)), tables.to(device), lens.to(device),
                              starts.to(device), dim ** -0.5)
        err = float((out.double().cpu() - ref).abs().max())
        report.add(f"Triton paged attention {str(dtype)[6:]} (decodes + prefill chunks)", f"max error {err:.1e} "
                   f"({time.perf_counter() - t0:.1f} s with compiling)", f"< {tol:g}", err < tol, hard=True)

    vocab = 49152
    seqs = []
    for i, params in enumerate([SamplingParams(temperature=0), SamplingParams(temperature=0, logprobs=5),
                                SamplingParams(temperature=0, repetition_penalty=1.3, logit_bias={7: 3.0}),
                                SamplingParams(temperature=0, frequency_penalty=0.5, presence_penalty=0.5)]):
        seq = Sequence(Request(str(i), [5, 6, 7], params, lambda _: None, 0.0), 0, [5, 6, 7], None, None)
        seq.append_token(9)
        seqs.append(seq)
    logits = torch.randn(len(seqs), vocab, generator=g)
    cpu = [t.token_id for t in sample(logits.clone(), seqs)]
    dev = [t.token_id for t in DeviceSampler(vocab, device).sample(logits.to(device), seqs)]
    report.add("device sampler greedy tokens = CPU sampler's", f"{sum(a == b for a, b in zip(cpu, dev))}/{len(cpu)}",
               "all", cpu == dev, hard=True)


# ------------------------------------------------------------------------------------------------ correctness
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three laws of thermodynamics are", "import numpy as np\nx =", "Translate to French: good morning"]


def hf_greedy(model_dir: Path, device: torch.device, dtype: torch.dtype, prompts: list[list[int]], n: int):
    model, tokenizer = bench_engine.load_hf(model_dir, device, dtype)
    try:
        return [bench_engine.hf_generate_one(model, tokenizer, ids, n, device)[0] for ids in prompts]
    finally:
        del model
        bench_engine.free_memory()


def engine_greedy(model_dir: Path, device: torch.device, dtype: str, prompts: list[list[int]], n: int):
    from tgi_nb.engine import EngineConfig, LLMEngine

    with LLMEngine(EngineConfig(model_id=str(model_dir), device=device.type, dtype=dtype)) as engine:
        params = bench_engine.greedy(n)
        alone = [engine.generate_sync(ids, params).outputs[0].token_ids for ids in prompts]
        together = [r.outputs[0].token_ids for r in engine.generate_sync(prompts, params)]
    bench_engine.free_memory()
    return alone, together


def check_correctness(report: Report, name: str, model_dir: Path, device: torch.device, half: str, n: int) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    ref = hf_greedy(model_dir, device, torch.float32, prompts, n)
    alone, together = engine_greedy(model_dir, device, "float32", prompts, n)
    same_alone = sum(a == r for a, r in zip(alone, ref))
    same_batch = sum(a == r for a, r in zip(together, ref))
    report.add(f"{name} float32 greedy = transformers ({len(prompts)} prompts x {n} tokens)",
               f"alone {same_alone}/{len(ref)}, batched {same_batch}/{len(ref)}", "all",
               same_alone == same_batch == len(ref), hard=True)
    ref = hf_greedy(model_dir, device, getattr(torch, half), prompts, n)
    alone, _ = engine_greedy(model_dir, device, half, prompts, n)
    firsts = [next((i for i, (a, b) in enumerate(zip(x, r)) if a != b), n) for x, r in zip(alone, ref)]
    report.add(f"{name} {half} greedy agreement with transformers", f"{sum(f == n for f in firsts)}/{len(ref)} "
               f"identical; first differences at tokens {sorted(f for f in firsts if f < n)}")


# ------------------------------------------------------------------------------------------------ performance
def check_throughput(report: Report, model_dir: Path, device: torch.device, dtype: str, smoke: bool) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if smoke:
        workload = make_workload(4, 16, 48, 8, 16, seed=0, tokenizer=tokenizer)
    else:
        workload = make_workload(64, 16, 512, 16, 256, seed=0, tokenizer=tokenizer)
    decode_prompt = make_workload(1, 32, 32, 16 if smoke else 256, 16 if smoke else 256, seed=2000,
                                  tokenizer=tokenizer)[0]
    args = Namespace(device=device.type, dtype=dtype, threads=torch.get_num_threads(), seed=0, skip=[],
                     decode_repeats=1 if smoke else 3, padded_batch_size=16, cb_attn="sdpa")
    log(f"[gpu_check] throughput workload: {describe(workload)}")
    bandwidth = bench_engine.measure_bandwidth(device, (64 << 20) if smoke else (2 << 30))
    tgi, decode = bench_engine.run_tgi_nb(args, model_dir, workload, decode_prompt)
    model, hf_tok = bench_engine.load_hf(model_dir, device, getattr(torch, dtype))
    try:
        padded = bench_engine.run_hf_padded(args, model, hf_tok, workload, device)
    finally:
        del model
        bench_engine.free_memory()
    batch = bench_engine.run_hf_generate_batch(args, model_dir, workload, device, getattr(torch, dtype))
    for other, target in ((batch, 10.0), (padded, None)):
        ratio = tgi.output_tok_s / other.output_tok_s if other.output_tok_s else 0.0
        report.add(f"output tok/s, tgi_nb vs {other.label}", f"{tgi.output_tok_s:.0f} vs "
                   f"{other.output_tok_s:.0f} ({ratio:.2f}x){' ' + other.error[:60] if other.error else ''}",
                   f">= {target:g}x" if target else "", ratio >= target if target else None)
    if tgi.error:
        report.add("tgi_nb workload errors", tgi.error, "none", False, hard=True)
    ceiling = max(bandwidth.values()) / bench_engine.weight_bytes_per_token(model_dir, getattr(torch, dtype))
    share = decode["tok_s"] / ceiling
    report.add("single-stream decode", f"{decode['tok_s']:.1f} tok/s = {100 * share:.0f}% of the ceiling "
               f"({ceiling:.0f} tok/s at {max(bandwidth.values()) / 1e9:.0f} GB/s)", ">= 50%", share >= 0.5)
    check_http_and_busy(report, model_dir, device, dtype, workload, tokenizer, smoke)


def gpu_busy_share(prof, wall_us: float) -> float:
    """Share of ``wall_us`` covered by the union of the profiled CUDA kernels."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA)
    covered, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            covered += b - max(a, end)
            end = b
    return covered / wall_us if wall_us else 0.0


def check_http_and_busy(report: Report, model_dir: Path, device: torch.device, dtype: str, workload, tokenizer,
                        smoke: bool) -> None:
    from torch.profiler import ProfilerActivity, profile

    from tgi_nb.engine import EngineConfig, LLMEngine
    from tgi_nb.server import ServerSettings, ServerThread, build_app

    bench_engine.free_memory()
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    engine = LLMEngine(EngineConfig(model_id=str(model_dir), device=device.type, dtype=dtype))
    server = ServerThread(build_app(engine, ServerSettings(max_concurrent_requests=1024)), port=0).start()
    try:
        bench_serve.run_engine(engine, make_workload(2, 16, 64, 4, 8, seed=7, vocab_size=engine.vocab_size))
        for streams in ((1, 2) if smoke else (1, 16, 64)):
            load = make_workload(streams, 128, 128, 16 if smoke else 128, 16 if smoke else 128, seed=streams,
                                 tokenizer=tokenizer)
            direct = bench_serve.run_engine(engine, load)
            http = asyncio.run(bench_serve.run_http_async(server.url, load))
            ratio = http.output_tok_s / direct.output_tok_s if direct.output_tok_s else 0.0
            report.add(f"HTTP streaming, {streams} streams (output tok/s, HTTP vs in process)",
                       f"{http.output_tok_s:.0f} vs {direct.output_tok_s:.0f} ({ratio:.2f}x)"
                       f"{', errors: ' + http.errors[0][:60] if http.errors else ''}", ">= 0.90x",
                       ratio >= 0.9 and not http.errors)
        if device.type == "cuda":
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                bench_serve.run_engine(engine, workload)
                wall_us = (time.perf_counter() - t0) * 1e6
            share = gpu_busy_share(prof, wall_us)
            report.add(f"GPU busy share of the {len(workload)}-request run", f"{100 * share:.0f}%", ">= 70%",
                       share >= 0.7)
        else:   # the profiler records CPU ops of its own thread only; the engine's run in another
            cpu, t0 = os.times(), time.perf_counter()
            bench_serve.run_engine(engine, workload)
            used = sum(os.times()[:2]) - sum(cpu[:2])
            share = used / ((time.perf_counter() - t0) * torch.get_num_threads())
            report.add(f"CPU busy share of the {len(workload)}-request run (process CPU time / wall x threads)",
                       f"{100 * share:.0f}%")
        gpu = engine.runner.gpu
        if gpu is not None:
            st = gpu.graphs.stats
            report.add("decode steps through CUDA graphs (GPU path)" if device.type == "cuda" else
                       "decode steps through the graph stand-in (GPU path on the CPU)",
                       f"{st.replays} replays, {st.eager} eager, buckets {gpu.graphs.sizes}; captured in "
                       f"{st.capture_seconds:.1f} s, {st.capture_bytes / 2**20:.0f} MiB")
        else:
            report.add("GPU path", "off: " + ("the CPU path" if device.type == "cpu" else "see the start-up log"),
                       "on" if device.type == "cuda" else "", None if device.type == "cpu" else False)
    finally:
        server.stop()
        engine.shutdown()
        bench_engine.free_memory()
    if device.type == "cuda":   # what pause / scale to zero do: the engine shut down gives its memory back
        left = torch.cuda.memory_allocated(device) - baseline
        report.add("GPU memory held after the engine shut down (pause)", f"{left / 2**20:.1f} MiB", "< 1 MiB",
                   left < 2**20)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    parser.add_argument("--smoke", action="store_true", help="one tiny model and small workloads (CPU: the suite)")
    parser.add_argument("--models", default=None, help="comma-separated shapes (default 135m,1.7b; tiny with --smoke)")
    parser.add_argument("--keep", type=Path, default=None, help="build the models in this folder and keep them")
    parser.add_argument("--json", type=Path, default=None, help="also write the table's rows to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    shapes = (args.models or ("tiny" if args.smoke else "135m,1.7b")).split(",")
    if unknown := [s for s in shapes if s not in SHAPES]:
        parser.error(f"--models: unknown shape {unknown[0]!r}; choose from {', '.join(SHAPES)}")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if device.type == "cpu":
        # the engine's GPU path on the CPU (Triton interpreted), so that the smoke runs what a GPU runs; the
        # interpreter has no bfloat16 products, so the half-precision check is in float16
        os.environ.setdefault("TGI_NB_GPU_PATH", "1")
        half = "float16"
    else:
        half = "bfloat16" if torch.cuda.get_device_capability(device) >= (8, 0) else "float16"
    speed_dtype = "float32" if device.type == "cpu" else half
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    started = time.perf_counter()
    report = Report()
    root = args.keep or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    try:
        check_kernels(report, device, getattr(torch, half))
        dirs = {}
        for shape in shapes:
            path = root / shape
            dirs[shape] = path if (path / "config.json").exists() else build_model(path, shape, device)
            check_correctness(report, shape, dirs[shape], device, half, 8 if args.smoke else 32)
        check_throughput(report, dirs[shapes[-1]], device, speed_dtype, args.smoke)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    note = "; on the CPU the GPU path runs Triton interpreted: its speeds mean nothing" if device.type == "cpu" else ""
    print(f"\n<!-- benchmarks/gpu_check.py{' --smoke' if args.smoke else ''} on {name}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}, {time.perf_counter() - started:.0f} s; throughput, decode, HTTP and busy "
          f"rows on the {shapes[-1]} shape in {speed_dtype}{note} -->")
    print(report.markdown())
    if args.json:
        args.json.write_text(json.dumps({"device": name, "rows": report.rows}, indent=2))
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
