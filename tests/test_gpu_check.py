"""benchmarks/gpu_check.py --device cpu --smoke: the GPU check's whole code path (model building, the Triton
kernels under the interpreter, the device sampler, greedy equality with transformers, the throughput, decode,
HTTP and busy measurements) on the CPU with a tiny model, as a user would run it; the engine takes its GPU path
(TGI_NB_GPU_PATH=1, Triton interpreted, the CUDA graphs' stand-in)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_on_the_cpu(tmp_path):
    pytest.importorskip("triton")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--smoke",
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout
    for check in ("Triton paged attention float32", "Triton paged attention float16", "device sampler greedy",
                  "tiny float32 greedy = transformers", "output tok/s, tgi_nb vs",
                  "single-stream decode", "HTTP streaming, 2 streams", "CPU busy share",
                  "decode steps through the graph stand-in (GPU path on the CPU)", "tiny float16 greedy agreement"):
        assert f"| {check}" in table, table
    assert "| FAIL |" not in table
    assert out.read_text().count('"pass"') >= 4
