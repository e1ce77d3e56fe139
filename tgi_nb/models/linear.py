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

A :class:`~tgi_nb.models.quant.QuantizedTensor` weight (GGUF blocks; or a ``QuantizedStack`` of several types)
takes ``csrc/quant_gemm.c`` for up to ``SMALL_GEMM_MAX_ROWS`` rows, and beyond where it measured faster (the fast
numerics; the exact ones on an AVX-512 build: :func:`~tgi_nb.models.quant.kernel_takes_large_batches`); otherwise
larger batches dequantize that one weight into a float32 scratch tensor and take the library path (see
``benchmarks/bench_linear.py --quantized``).
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch
import torch.nn.functional as F

from . import native
from .quant import QuantizedStack, QuantizedTensor, kernel_takes_large_batches, quantized_linear

# Up to this many rows the native kernel beats MKL and oneDNN on the 2-core EPYC VM (also the most rows the
# kernel's fused silu_mul takes).
SMALL_GEMM_MAX_ROWS = 64
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")

_GEMM = native.NativeFunction(
    "small_gemm", "tgi_nb_small_gemm",
    [ctypes.c_void_p] * 5 + [ctypes.c_int] * 4 + [ctypes.c_void_p, ctypes.c_float, ctypes.c_int],
    extra_flags=["-fopenmp"], switch="TGI_NB_NATIVE_LINEAR")


def native_linear_available() -> bool:
    """Whether float32 CPU products with few rows run on the native kernel (building it on first call)."""
    return _GEMM.available()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           residual: Optional[torch.Tensor] = None, *, norm: Optional[tuple[torch.Tensor, float]] = None,
           silu_mul: bool = False, numerics: str = "exact") -> torch.Tensor:
    """``x @ weight.T + bias + residual`` for a 2-D ``x``; ``bias`` and ``residual`` are optional.

    Two fusions a transformer layer wants, done inside the native kernel (and by torch ops otherwise):
    - ``norm=(norm_weight, eps)``: RMS-normalize ``x`` first, as ``F.rms_norm(x, ..., norm_weight, eps)``;
    - ``silu_mul=True``: ``weight`` is a fused ``[gate; up]`` projection of ``2 * I`` rows and the result is
      ``silu(x @ gate.T) * (x @ up.T)``, ``[rows, I]`` (no ``residual``).

    ``numerics="fast"`` (quantized weights only): int8 activations and integer dot products at any number of rows
    (see :func:`tgi_nb.models.quant.quantized_linear`); ``"exact"`` computes with float32 activations.

    Example:
        >>> x, w, r = torch.randn(2, 8), torch.randn(4, 8), torch.randn(2, 4)
        >>> torch.allclose(linear(x, w, residual=r), x @ w.T + r, atol=1e-5)
        True
        >>> g = torch.ones(8)
        >>> ref = F.rms_norm(x, (8,), g, 1e-6) @ w.T
        >>> gate, up = ref.chunk(2, dim=-1)
        >>> torch.allclose(linear(x, w, norm=(g, 1e-6), silu_mul=True), F.silu(gate) * up, atol=1e-5)
        True
    """
    if silu_mul and residual is not None:
        raise ValueError("linear(silu_mul=True) takes no residual")
    rows = x.shape[0]
    if isinstance(weight, (QuantizedTensor, QuantizedStack)):
        if (0 < rows and (rows <= SMALL_GEMM_MAX_ROWS or kernel_takes_large_batches(weight, numerics))
                and x.dtype == torch.float32 and x.device.type == "cpu"):
            out = quantized_linear(x, weight, bias, residual, norm=norm, silu_mul=silu_mul, numerics=numerics)
            if out is not None:
                return out
        weight = weight.dequantize().to(x.dtype)
    if (0 < rows <= SMALL_GEMM_MAX_ROWS and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.device.type == "cpu" and native_linear_available()):
        x = x.contiguous()
        out_features = weight.shape[0] // 2 if silu_mul else weight.shape[0]
        out = torch.empty(rows, out_features, dtype=x.dtype)
        if residual is not None:
            residual = residual.contiguous()
        norm_weight, eps = norm if norm is not None else (None, 0.0)
        rc = _GEMM.get()(x.data_ptr(), weight.data_ptr(), bias.data_ptr() if bias is not None else None,
                         residual.data_ptr() if residual is not None else None, out.data_ptr(),
                         rows, weight.shape[0], weight.shape[1], torch.get_num_threads(),
                         norm_weight.data_ptr() if norm_weight is not None else None, eps, int(silu_mul))
        if rc == 1:
            raise MemoryError("the native linear kernel could not allocate its scratch buffer")
        if rc:
            raise ValueError(f"the native linear kernel refused rows={rows}, weight {tuple(weight.shape)}")
        return out
    if norm is not None:
        x = F.rms_norm(x, (x.shape[-1],), norm[0], norm[1])
    if _ONEDNN and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu":
        out = torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
        out = out if residual is None else out.add_(residual)
    elif residual is None:
        out = F.linear(x, weight, bias)
    else:
        out = torch.addmm(residual, x, weight.t())
        out = out if bias is None else out.add_(bias)
    if silu_mul:
        gate, up = out.chunk(2, dim=-1)
        out = F.silu(gate) * up
    return out
