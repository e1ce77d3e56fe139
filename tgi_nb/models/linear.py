"""Linear layers: a native kernel for a few rows, oneDNN or BLAS for the rest.

``linear(x, weight, bias, residual)`` computes ``x @ weight.T (+ bias) (+ residual)``. For float32 CPU inputs
with at most ``SMALL_GEMM_MAX_ROWS`` rows it calls ``csrc/small_gemm.c``, which streams the weight at close to
the machine's memory bandwidth. Larger float32 batches (prefill chunks, big decode batches) are compute-bound
and go to oneDNN, which torch bundles. Measured on the 2-core AMD EPYC VM, all of SmolLM2-135M's linear layers
for M rows (benchmarks/bench_linear.py):

    rows   MKL (torch default)   oneDNN     native
    1        60 ms                 40 ms     33 ms
    16      121 ms                 90 ms     61 ms
    64      202 ms                172 ms    167 ms
    128     312 ms                281 ms    402 ms
    512    1121 ms               1066 ms   1536 ms

``TGI_NB_NATIVE_LINEAR=0`` turns the native kernel off.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from typing import Optional

import torch
import torch.nn.functional as F

from . import native

logger = logging.getLogger(__name__)

# Up to this many rows the native kernel beats MKL and oneDNN on the 2-core EPYC VM.
SMALL_GEMM_MAX_ROWS = 64
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_DISABLE_VALUES = {"0", "false", "no", "off"}

_lock = threading.Lock()
_kernel = None
_build_failed = False


def _load():
    global _kernel, _build_failed
    if _kernel is not None or _build_failed:
        return _kernel
    with _lock:
        if _kernel is not None or _build_failed:
            return _kernel
        compiler = native.find_compiler()
        path = native.compile_library(compiler, "small_gemm", ["-fopenmp"]) if compiler else None
        if path is None:
            _build_failed = True
            return None
        try:
            fn = ctypes.CDLL(str(path)).tgi_nb_small_gemm
        except (OSError, AttributeError) as exc:
            logger.warning("could not load the native linear kernel (%s); using torch's BLAS", exc)
            _build_failed = True
            return None
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 4
        _kernel = fn
        return _kernel


def native_linear_available() -> bool:
    """Whether float32 CPU products with few rows run on the native kernel (building it on first call)."""
    return os.environ.get("TGI_NB_NATIVE_LINEAR", "1").strip().lower() not in _DISABLE_VALUES and _load() is not None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight.T + bias + residual`` for a 2-D ``x``; ``bias`` and ``residual`` are optional.

    Example:
        >>> x, w, r = torch.randn(2, 8), torch.randn(4, 8), torch.randn(2, 4)
        >>> torch.allclose(linear(x, w, residual=r), x @ w.T + r, atol=1e-5)
        True
    """
    rows = x.shape[0]
    if (0 < rows <= SMALL_GEMM_MAX_ROWS and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.device.type == "cpu" and native_linear_available()):
        x = x.contiguous()
        out = torch.empty(rows, weight.shape[0], dtype=x.dtype)
        if residual is not None:
            residual = residual.contiguous()
        _kernel(x.data_ptr(), weight.data_ptr(), bias.data_ptr() if bias is not None else None,
                residual.data_ptr() if residual is not None else None, out.data_ptr(),
                rows, weight.shape[0], weight.shape[1], torch.get_num_threads())
        return out
    if _ONEDNN and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu":
        out = torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
        return out if residual is None else out.add_(residual)
    if residual is None:
        return F.linear(x, weight, bias)
    out = torch.addmm(residual, x, weight.t())
    return out if bias is None else out.add_(bias)
