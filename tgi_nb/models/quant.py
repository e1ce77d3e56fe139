"""Products with GGUF block-quantized weights kept as stored: ``linear()``'s contract on the native kernels of
``csrc/quant_gemm.c`` (any number of rows, both numerics, the RMSNorm and silu * up fusions).

The weights are :class:`~tgi_nb.models.quant_formats.QuantizedTensor` (GGML's blocks of Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0, Q4_K, Q5_K, Q6_K as in the file, or regrouped 16 rows at a time: :mod:`tgi_nb.models.quant_layouts`) or
:class:`~tgi_nb.models.quant_formats.QuantizedStack` (rows of different types in one fused weight). Each block is
turned into numbers in registers and multiplied at once ("exact" numerics: float32 activations, the dequantized
weights bit for bit, only the summation order differs from a float matmul; "fast": llama.cpp's int8 activations).
Which kernel build runs: :mod:`tgi_nb.models.quant_kernels`. GGUF files: :mod:`tgi_nb.models.quant_gguf`.

This module also names what the rest of the model layer imports from those (one place to import from).
"""

from __future__ import annotations

from typing import Optional

import torch

from .quant_formats import (BLOCK, BLOCK_BYTES, BLOCK_WEIGHTS, LAYOUTS, QTYPE_IDS, QuantizedStack,  # noqa: F401
                            QuantizedTensor)
from .quant_gguf import GGUF_ARCHITECTURES, read_gguf_quantized, read_gguf_tensor_table  # noqa: F401
from .quant_kernels import (KERNELS, VARIANTS, build_flags, kernel_variant, runnable_variants,  # noqa: F401
                            vector_width)
from .quant_layouts import GROUP  # noqa: F401

NUMERICS = ("exact", "fast")
_SILU_MAX_ROWS = 64   # rows per call of a product with silu_mul (csrc/quant_gemm.c's SILU_MAX_ROWS)
_PER_ROW_TYPES = ("q4_0", "q4_1", "q8_0")     # the GGML-layout kernel's; every type computes in rows16


Quantized = QuantizedTensor | QuantizedStack


def quantized_linear(x: torch.Tensor, weight: Quantized, bias: Optional[torch.Tensor] = None,
                     residual: Optional[torch.Tensor] = None, *, norm: Optional[tuple[torch.Tensor, float]] = None,
                     silu_mul: bool = False, variant: Optional[str] = None,
                     numerics: str = "exact") -> Optional[torch.Tensor]:
    """``linear()``'s contract for a quantized weight and float32 CPU ``x``, on the native kernel (``variant``,
    default :func:`kernel_variant`); None when no kernel is available (the caller then dequantizes). Any number of
    rows (``silu_mul`` in chunks of 64); :func:`kernel_takes_large_batches` says when more than 64 pay. See
    :func:`tgi_nb.models.linear.linear` for ``norm`` and ``silu_mul``.

    ``numerics``:

    - ``"exact"``: quantized weights times float32 activations (each dequantized weight is the float32 value
      gguf's dequantizer gives; only the summation order differs from a float matmul);
    - ``"fast"``: llama.cpp's: each row of ``x`` (after ``norm``) is quantized to int8, per block of 32 as
      llama.cpp's ``quantize_row_q8_0`` for the 32-weight types and per 256 as ``quantize_row_q8_K`` for the
      K-quants, and each block's product is an integer dot product (AVX-512 VNNI's ``dpbusd``; ``maddubs`` on
      AVX2), scaled per block. Several times fewer instructions per weight; the cost is the activations' rounding
      (about 1% relative error on the output of random data). Each row's result does not depend on the others.

    Both compute on the rows16 layout (a GGML-layout weight is converted per call: convert at load to avoid that),
    except the exact numerics of a GGML-layout Q4_0, Q4_1 or Q8_0 weight, which has a per-row kernel of its own.

    Example:
        >>> w = QuantizedTensor.quantize(torch.randn(8, 64), "q4_1")
        >>> x = torch.randn(3, 64)
        >>> out = quantized_linear(x, w)
        >>> out is None or torch.allclose(out, x @ w.dequantize().T, atol=1e-4)
        True
        >>> fast = quantized_linear(x, w, numerics="fast")
        >>> fast is None or ((fast - out).norm() / out.norm()).item() < 0.05
        True
    """
    if numerics not in NUMERICS:
        raise ValueError(f"numerics: must be one of {', '.join(NUMERICS)}, got {numerics!r}")
    variant = variant or kernel_variant()
    if variant is None:
        return None
    n, k = weight.shape
    rows = x.shape[0]
    x = x.contiguous()
    if residual is not None:
        residual = residual.contiguous()
    norm_weight, eps = norm if norm is not None else (None, 0.0)
    if numerics == "exact" and weight.layout == "ggml" and weight.qtype in _PER_ROW_TYPES:
        kernel, w_arg, count = KERNELS[variant]["ggml"][0], weight.data.data_ptr(), QTYPE_IDS[weight.qtype]
    else:
        if weight.layout == "ggml":
            weight = weight.to_layout("rows16")
        kernel = KERNELS[variant]["rows16" if numerics == "exact" else "rows16_q8"]
        kernel = kernel[0] if numerics == "exact" else kernel
        segments = weight.segments()
        w_arg, count = segments.data_ptr(), segments.shape[0]
        if silu_mul and not gated_on_groups(weight):
            # The up half does not start on a group: the whole product, then silu_mul in torch.
            both = torch.empty(rows, n, dtype=torch.float32)
            _run(kernel, x, w_arg, count, weight, bias, None, both, norm_weight, eps, False)
            return torch.nn.functional.silu(both[:, :n // 2]) * both[:, n // 2:]
    out = torch.empty(rows, n // 2 if silu_mul else n, dtype=torch.float32)
    # Any number of rows, except with silu_mul, whose per-thread scratch holds 64.
    step = _SILU_MAX_ROWS if silu_mul else max(rows, 1)
    for start in range(0, max(rows, 1), step):
        stop = min(start + step, rows)
        _run(kernel, x[start:stop], w_arg, count, weight, bias, None if residual is None else residual[start:stop],
             out[start:stop], norm_weight, eps, silu_mul)
    return out


def gated_on_groups(weight: Quantized) -> bool:
    """Whether every 16 rows of a [gate; up] weight's gate half, and the up rows they pair with, start a group of
    their part and lie in it (csrc/quant_gemm.c's gated_valid): the kernels then fuse silu(gate) * up.

    Example:
        >>> gated_on_groups(QuantizedTensor.quantize(torch.randn(64, 32), "q8_0"))      # 32 + 32 rows
        True
        >>> gated_on_groups(QuantizedTensor.quantize(torch.randn(70, 32), "q8_0"))      # up starts at row 35
        False
    """
    half, parts, row = weight.shape[0] // 2, [], 0
    for part in weight.parts:
        parts.append((row, part.shape[0]))
        row += part.shape[0]

    def starts_group(r: int, width: int) -> bool:
        return any(start <= r < start + rows and (r - start) % GROUP == 0 and rows - (r - start) >= width
                   for start, rows in parts)

    return weight.shape[0] % 2 == 0 and all(
        starts_group(n, min(GROUP, half - n)) and starts_group(half + n, min(GROUP, half - n))
        for n in range(0, half, GROUP))


def kernel_takes_large_batches(weight: Quantized, numerics: str = "exact") -> bool:
    """Whether products of more than 64 rows should stay on the quantized kernel rather than dequantize the weight
    and take oneDNN: always with the fast numerics; with the exact ones on rows16 blocks and an AVX-512 build, which
    measured faster there (benchmarks/bench_linear.py --quantized, all of SmolLM2's layers at 256 rows: 369 ms
    against 425 ms), while the AVX2 build measured slower (804 ms).

    Example:
        >>> kernel_takes_large_batches(QuantizedTensor.quantize(torch.randn(16, 32), "q8_0"), "fast")
        True
    """
    if numerics == "fast":
        return True
    variant = kernel_variant()
    return weight.layout == "rows16" and variant is not None and vector_width(variant) == 16


def _run(kernel, x: torch.Tensor, w_arg: int, count: int, weight: Quantized, bias: Optional[torch.Tensor],
         residual: Optional[torch.Tensor], out: torch.Tensor, norm_weight: Optional[torch.Tensor], eps: float,
         silu_mul: bool) -> None:
    n, k = weight.shape
    rc = kernel.get()(
        x.data_ptr(), w_arg, count, bias.data_ptr() if bias is not None else None,
        residual.data_ptr() if residual is not None else None, out.data_ptr(), x.shape[0], n, k,
        torch.get_num_threads(), norm_weight.data_ptr() if norm_weight is not None else None, eps, int(silu_mul))
    if rc == 1:
        raise MemoryError("the quantized linear kernel could not allocate its scratch buffer")
    if rc:
        raise ValueError(f"the quantized linear kernel refused rows={x.shape[0]}, "
                         f"weight {weight.qtype} {weight.shape}")
