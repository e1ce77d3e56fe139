"""All of SmolLM2-135M's linear layers (30 x q|k|v, o, gate|up, down, plus the lm_head) for M rows, three ways.

    .venv/bin/python benchmarks/bench_linear.py [--rows 1 4 16 32 64 128 256 512]

MKL (torch's default for F.linear on CPU), oneDNN (torch.ops.mkldnn._linear_pointwise) and tgi_nb's native
small-batch kernel (csrc/small_gemm.c), same weights, same process, 2 threads. Prints ms per pass, GFLOPS and
GB/s of weights read. tgi_nb.models.linear picks between them by row count from these numbers.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import tgi_nb.models.linear as lin

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 32, 64, 128, 256, 512])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    weights = [torch.randn(shape) for _ in range(30) for shape in SHAPES] + [torch.randn(49152, 576)]
    weight_bytes = sum(w.numel() for w in weights) * 4
    lin.SMALL_GEMM_MAX_ROWS = 1 << 30  # let the native path take every size here
    systems = {
        "mkl": lambda x, w: F.linear(x, w),
        "onednn": lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
        "native": lambda x, w: lin.linear(x, w),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, weights {weight_bytes / 1e6:.0f} MB")
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
                start = time.perf_counter()
                for _ in range(args.repeats):
                    one_pass()
                dt = (time.perf_counter() - start) / args.repeats
                cells.append(f"{dt * 1e3:7.1f} ms {flops / dt / 1e9:5.0f} GF {weight_bytes / dt / 1e9:5.1f} GB/s")
            print(f"{rows:>5} " + " ".join(f"{c:>26}" for c in cells))


if __name__ == "__main__":
    main()
