"""All of SmolLM2-135M's linear layers (30 x q|k|v, o, gate|up, down, plus the lm_head) for M rows, three ways.

    .venv/bin/python benchmarks/bench_linear.py [--rows 1 4 16 32 64 128 256 512]

MKL (torch's default for F.linear on CPU), oneDNN (torch.ops.mkldnn._linear_pointwise) and tgi_nb's native
small-batch kernel (csrc/small_gemm.c), same weights, same process, 2 threads. Prints ms per pass, GFLOPS and
GB/s of weights read. tgi_nb.models.linear picks between them by row count from these numbers.

``--quantized``: the same layers as the bundled GGUF holds them (Q4_1, the lm_head Q8_0; rows16 layout, as the
engine keeps them), on each quantized kernel variant this CPU runs (csrc/quant_gemm.c, exact numerics), with the
fast numerics on the best variant (int8 activations, integer dot products), and as "dequantize the layer to a
float32 scratch, then oneDNN" (the exact path for more than 64 rows), beside the float32 native kernel. ``--cpu-time`` reports the
calling thread's CPU time instead of wall time (use with ``--threads 1``): on a machine shared with other jobs
it stays comparable while wall time does not.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import tgi_nb.models.linear as lin
from tgi_nb.models import quant

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 32, 64, 128, 256, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quantized", action="store_true", help="GGUF blocks: each kernel variant, dequant+oneDNN")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cpu-time", action="store_true", help="time with the thread's CPU clock")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    weights = [torch.randn(shape) for _ in range(30) for shape in SHAPES] + [torch.randn(49152, 576)]
    weight_bytes = sum(w.numel() for w in weights) * 4
    lin.SMALL_GEMM_MAX_ROWS = 1 << 30  # let the native path take every size here
    systems = {
        "mkl": lambda x, w: F.linear(x, w),
        "onednn": lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
        "native": lambda x, w: lin.linear(x, w),
    }
    if args.quantized:
        blocks = {id(w): quant.QuantizedTensor.quantize(w, "q8_0" if w.shape[0] == 49152 else "q4_1").to_layout("rows16")
                  for w in weights}
        systems = {"native fp32": systems["native"]}
        for variant in quant.runnable_variants():
            systems[variant] = lambda x, w, v=variant: quant.quantized_linear(x, blocks[id(w)], variant=v)
        systems["fast"] = lambda x, w: quant.quantized_linear(x, blocks[id(w)], numerics="fast")
        systems["dequant+onednn"] = lambda x, w: torch.ops.mkldnn._linear_pointwise(
            x, blocks[id(w)].dequantize(), None, "none", [], "")
        quant_bytes = sum(b.nbytes for b in blocks.values())
        print(f"quantized weights {quant_bytes / 1e6:.0f} MB (GB/s below count float32 bytes)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, weights {weight_bytes / 1e6:.0f} MB, "
          f"{'thread CPU time' if args.cpu_time else 'wall time'}")
    print(f"{'rows':>5} " + " ".join(f"{name:>26}" for name in systems))
    with torch.inference_mode():
        for rows in args.rows:
            inputs = {k: torch.randn(rows, k) for k in (576, 1536)}
            flops = 2 * rows * weight_bytes / 4
            cells = []
            for fn in systems.values():
                def one_pass():
                    for w in weights:
                        fn(inputs[w.shape[1]], w)
                one_pass()
                start = clock()
                for _ in range(args.repeats):
                    one_pass()
                dt = (clock() - start) / args.repeats
                cells.append(f"{dt * 1e3:7.1f} ms {flops / dt / 1e9:5.0f} GF {weight_bytes / dt / 1e9:5.1f} GB/s")
            print(f"{rows:>5} " + " ".join(f"{c:>26}" for c in cells))


if __name__ == "__main__":
    main()
