"""Decode attention over a paged KV cache on CPU, SmolLM2-135M shapes.

    python benchmarks/bench_attention.py                 # full table, torch's thread count
    python benchmarks/bench_attention.py --quick         # shorter measurements
    python benchmarks/bench_attention.py --threads 1     # one thread for every system

Compares, in one process on the same data:
- native:      tgi_nb's C kernel (paged_decode_attention, float32)
- torch:       tgi_nb's torch fallback (gather the blocks of a few sequences, one masked SDPA per chunk)
- paged-sdpa:  per sequence: gather its blocks, F.scaled_dot_product_attention
- contig-sdpa: per sequence SDPA over contiguous K/V, i.e. what a non-paged engine does (no gather at all)

Each call is one layer; successive calls cycle over separate per-layer caches (as a forward pass does, up to the
model's 30 layers) so that large batches read K/V from memory rather than from a warm cache.
Reported: microseconds per layer call (best of several runs), effective GB/s of the K/V attended to, and time
relative to native.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tgi_nb.models import attention  # noqa: E402
from tgi_nb.models.attention import native_kernel_available, paged_decode_attention  # noqa: E402

NUM_HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_LAYERS = 9, 3, 64, 16, 30
TARGET_WORKING_SET = 96 << 20  # bytes of K/V over all cycled layers: well past a 32 MiB L3


def make_layers(lens, n_layers, gen):
    need = [-(-n // BLOCK_SIZE) for n in lens]
    num_blocks = sum(need) + 1
    max_blocks = max(need)
    layers = []
    for _ in range(n_layers):
        perm = torch.randperm(num_blocks, generator=gen)
        tables = torch.zeros(len(lens), max_blocks, dtype=torch.int32)
        i = 0
        for b, n in enumerate(need):
            tables[b, :n] = perm[i:i + n].to(torch.int32)
            i += n
        shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
        k, v = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        # the same K/V as contiguous per-sequence [1, kvh, T, d] tensors, for the non-paged baseline
        contig = []
        for b, n in enumerate(lens):
            idx = tables[b, :need[b]].long()
            kc = k[idx].reshape(-1, KV_HEADS, HEAD_DIM)[:n].transpose(0, 1).unsqueeze(0).contiguous()
            vc = v[idx].reshape(-1, KV_HEADS, HEAD_DIM)[:n].transpose(0, 1).unsqueeze(0).contiguous()
            contig.append((kc, vc))
        layers.append((k, v, tables, contig))
    return layers


def paged_sdpa(q, k_cache, v_cache, tables, lens, scale):
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        n = int(lens[b])
        idx = tables[b, :-(-n // BLOCK_SIZE)].long()
        k = k_cache.index_select(0, idx).view(-1, KV_HEADS, HEAD_DIM)[:n].transpose(0, 1).unsqueeze(0)
        v = v_cache.index_select(0, idx).view(-1, KV_HEADS, HEAD_DIM)[:n].transpose(0, 1).unsqueeze(0)
        out[b] = F.scaled_dot_product_attention(q[b].view(1, NUM_HEADS, 1, HEAD_DIM), k, v, scale=scale,
                                                enable_gqa=True)[0, :, 0]
    return out


def contig_sdpa(q, contig, scale):
    out = torch.empty_like(q)
    for b, (k, v) in enumerate(contig):
        out[b] = F.scaled_dot_product_attention(q[b].view(1, NUM_HEADS, 1, HEAD_DIM), k, v, scale=scale,
                                                enable_gqa=True)[0, :, 0]
    return out


def time_per_call(fn, n_layers, min_time, repeats):
    """Best over `repeats` of the mean over a loop lasting about `min_time` seconds."""
    fn(0)
    t0 = time.perf_counter()
    calls = 0
    while time.perf_counter() - t0 < min_time / 4 or calls < n_layers:
        fn(calls % n_layers)
        calls += 1
    per = (time.perf_counter() - t0) / calls
    loop = max(n_layers, int(min_time / per))
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(loop):
            fn(i % n_layers)
        best = min(best, (time.perf_counter() - t0) / loop)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short runs (about 0.05 s per measurement)")
    ap.add_argument("--threads", type=int, default=None, help="torch/native threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    min_time, repeats = (0.05, 5) if args.quick else (0.3, 5)
    native = native_kernel_available()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"# {cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"native kernel: {native}, load average at start: {load}")
    print(f"# heads {NUM_HEADS}, kv heads {KV_HEADS}, head_dim {HEAD_DIM}, block {BLOCK_SIZE}, float32; "
          "us per layer call (GB/s of K/V read); x = time / native time")
    methods = (["native"] if native else []) + ["torch", "paged-sdpa", "contig-sdpa"]
    header = f"{'batch':>5} {'ctx':>5} {'layers':>6} | " + " | ".join(f"{m:>22}" for m in methods)
    print(header)
    print("-" * len(header))
    gen = torch.Generator().manual_seed(0)
    scale = HEAD_DIM ** -0.5
    for batch in (1, 16, 64):
        for ctx in (100, 600):
            # contexts spread +-20% around the nominal value, as in a real decode batch
            lens = [max(1, int(ctx * (0.8 + 0.4 * torch.rand((), generator=gen).item()))) for _ in range(batch)]
            kv_bytes = sum(lens) * KV_HEADS * HEAD_DIM * 4 * 2
            n_layers = max(1, min(NUM_LAYERS, -(-TARGET_WORKING_SET // kv_bytes)))
            layers = make_layers(lens, n_layers, gen)
            lens_t = torch.tensor(lens, dtype=torch.int32)
            q = torch.randn(batch, NUM_HEADS, HEAD_DIM, generator=gen)
            out = torch.empty_like(q)
            fns = {
                "native": lambda i: paged_decode_attention(q, layers[i][0], layers[i][1], layers[i][2], lens_t,
                                                           scale, out=out),
                "torch": lambda i: attention._torch_paged_decode_attention(
                    q, layers[i][0], layers[i][1], layers[i][2], lens_t, scale, 0),
                "paged-sdpa": lambda i: paged_sdpa(q, layers[i][0], layers[i][1], layers[i][2], lens_t, scale),
                "contig-sdpa": lambda i: contig_sdpa(q, layers[i][3], scale),
            }
            ref = fns["contig-sdpa"](0)
            for m in methods:  # all methods compute the same thing
                torch.testing.assert_close(fns[m](0), ref, rtol=1e-4, atol=1e-4)
            times = {m: time_per_call(fns[m], n_layers, min_time, repeats) for m in methods}
            base = times.get("native")
            cells = []
            for m in methods:
                t = times[m]
                rel = f" {t / base:5.1f}x" if base else ""
                cells.append(f"{t * 1e6:8.1f} ({kv_bytes / t / 1e9:5.1f}){rel}")
            print(f"{batch:>5} {ctx:>5} {n_layers:>6} | " + " | ".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
