"""Where the time of one single-sequence decode step goes: the SmolLM2 forward at one token, several ways.

    .venv/bin/python benchmarks/bench_decode_step.py [--rounds 15] [--calls 10] [--context 128]

- ``tgi_nb``: what the engine runs on CPU float32: RMSNorm fused into the q|k|v and gate|up products,
  silu(gate) * up as the gate|up epilogue, RoPE + KV write in one native call, native decode attention,
  weights in the huge-page arena (``tgi_nb.models.llama.WeightArena``);
- ``4k pages``: the same with every weight copied out of the arena into ordinary torch allocations;
- ``torch rope``: ``TGI_NB_NATIVE_ROPE=0``, RoPE and the KV write as torch ops;
- ``torch ops``: also ``TGI_NB_NATIVE_LINEAR=0``, every product through oneDNN and the norms and silu as torch ops;
- ``gguf blocks``: the engine's default for the bundled model: the GGUF's Q4_1 / Q8_0 blocks as stored, on the
  best quantized kernel variant this CPU runs (96 MB read per token instead of 538 MB); ``gguf blocks avx2``: the
  same forced onto the AVX2 build (``TGI_NB_QUANT_KERNEL=avx2``), where the CPU runs it; ``gguf blocks fast``: the
  GGUF blocks with the fast numerics (``--numerics fast``: int8 activations, integer dot products);
  ``gguf per layer``: the GGUF blocks with the fused decode step off (``TGI_NB_FUSED_DECODE=0``: six calls per
  layer from Python, as before the fused step).

The variants run interleaved, ``--calls`` forwards each per round, in one process, so a change of the host's
load hits them all alike; the table gives the best and the median round (ms per forward) and the decode rate
that forward alone would allow. The forward reads 538 MB of weights, so the floor is that over the machine's
memory bandwidth (see bench_engine.py's decode ceiling).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tgi_nb.engine.budget import choose_num_threads  # noqa: E402
from tgi_nb.models import quant, resolve_model, source_gguf  # noqa: E402
from tgi_nb.models.attention import AttentionBatch  # noqa: E402
from tgi_nb.models.llama import LlamaModel  # noqa: E402

VARIANTS = {
    "tgi_nb": {},
    "4k pages": {},
    "torch rope": {"TGI_NB_NATIVE_ROPE": "0"},
    "torch ops": {"TGI_NB_NATIVE_ROPE": "0", "TGI_NB_NATIVE_LINEAR": "0"},
    "gguf blocks": {},
    "gguf blocks avx2": {"TGI_NB_QUANT_KERNEL": "avx2"},
    "gguf blocks fast": {},
    "gguf per layer": {"TGI_NB_FUSED_DECODE": "0"},
}


def out_of_arena(model: LlamaModel) -> LlamaModel:
    """A shallow copy of the model whose weights are ordinary torch allocations (4 KiB pages)."""
    plain = copy.copy(model)
    plain.layers = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in layer.items()}
                    for layer in model.layers]
    plain.embed, plain.norm = model.embed.clone(), model.norm.clone()
    plain.lm_head = plain.embed if model.lm_head is model.embed else model.lm_head.clone()
    return plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--context", type=int, default=128, help="tokens already in the KV cache")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: every core)")
    parser.add_argument("--kv-dtype", choices=["float32", "float16"], default="float32",
                        help="the KV cache's type (float16: --kv-cache-dtype float16, half the bytes to read)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or choose_num_threads().count)

    path = resolve_model(None).path
    model = LlamaModel.load(path, dtype=torch.float32)
    models = {"tgi_nb": model, "4k pages": out_of_arena(model)}
    if source_gguf(path) is not None:
        models["gguf blocks"] = models["gguf blocks avx2"] = LlamaModel.load(path, gguf_file=source_gguf(path))
        models["gguf per layer"] = models["gguf blocks"]
        fast = models["gguf blocks fast"] = copy.copy(models["gguf blocks"])
        fast._fused = False          # its own fused step, reading its own numerics
        fast.set_numerics("fast")
    if "avx2" not in quant.runnable_variants() or "gguf blocks" not in models:
        del VARIANTS["gguf blocks avx2"]
    if "gguf blocks" not in models:
        for name in ("gguf blocks", "gguf blocks fast", "gguf per layer"):
            del VARIANTS[name]
    spec, block_size = model.spec, 16
    num_blocks = args.context // block_size + 2
    shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
    kv_dtype = getattr(torch, args.kv_dtype)
    kv = [(torch.randn(shape).to(kv_dtype), torch.randn(shape).to(kv_dtype)) for _ in range(spec.num_layers)]
    pos = args.context
    batch = AttentionBatch(slot_mapping=torch.tensor([pos]), num_decodes=1,
                           decode_block_tables=torch.arange(num_blocks, dtype=torch.int32)[None],
                           decode_context_lens=torch.tensor([pos + 1], dtype=torch.int32), prefills=[])
    inputs = (torch.tensor([1234]), torch.tensor([pos]), batch, kv, torch.tensor([0]))

    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with torch.inference_mode():
        for round_ in range(args.rounds + 1):   # round 0 warms up (kernel builds, page faults)
            for name, env in VARIANTS.items():
                os.environ.update(env)
                forward = models.get(name, model).forward
                start = time.perf_counter()
                for _ in range(args.calls):
                    forward(*inputs)
                elapsed = (time.perf_counter() - start) / args.calls
                for key in env:
                    del os.environ[key]
                if round_:
                    times[name].append(elapsed)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, SmolLM2-135M, one token at "
          f"context {args.context}, {args.kv_dtype} KV cache; {args.rounds} rounds of {args.calls} forwards")
    print("| variant | best ms | median ms | tok/s at best | tok/s at median |")
    print("|---|---:|---:|---:|---:|")
    for name, values in times.items():
        best, median = min(values) * 1e3, statistics.median(values) * 1e3
        print(f"| {name} | {best:.1f} | {median:.1f} | {1e3 / best:.1f} | {1e3 / median:.1f} |")


if __name__ == "__main__":
    main()
