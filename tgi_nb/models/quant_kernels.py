"""The native kernels of GGUF block-quantized weights (``csrc/quant_gemm.c``): which variant this CPU runs.

The kernels are built once per instruction set and the one this CPU runs best is picked at run time
(:func:`kernel_variant`): ``avx512vnni`` (``avx512`` plus VNNI's dpbusd, for the "fast" numerics), ``avx512``
(``-march=x86-64-v4``), ``avx2`` (``-march=x86-64-v3``: AVX2, FMA, F16C) or ``generic`` (plain x86-64 SSE2,
software fp16; the native flags on other machines). ``TGI_NB_QUANT_KERNEL`` forces one (a benchmark comparing
them; a test running each), ``TGI_NB_QUANT_KERNEL=0`` turns the kernels off and weights are dequantized by gguf's
numpy code instead.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from typing import Optional

from . import native

# Instruction sets the kernel is built for, best first: the flags, and the /proc/cpuinfo flags a CPU needs.
_AVX512 = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma", "f16c"}
VARIANTS = {
    # The exact kernels are avx512's; the fast numerics' integer dot products take VNNI's dpbusd.
    "avx512vnni": (["-march=x86-64-v4", "-mavx512vnni"], _AVX512 | {"avx512_vnni"}),
    "avx512": (["-march=x86-64-v4"], _AVX512),
    "avx2": (["-march=x86-64-v3"], {"avx2", "fma", "f16c", "bmi2", "movbe"}),
    "generic": (["-march=x86-64"], set()),
}
_X86 = platform.machine().lower() in ("x86_64", "amd64")
_SWITCH = "TGI_NB_QUANT_KERNEL"
_DISABLE_VALUES = {"0", "false", "no", "off"}


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def runnable_variants() -> list[str]:
    """The kernel variants this CPU can run, best first (on non-x86 machines only ``generic``).

    Example:
        >>> runnable_variants()[-1]
        'generic'
    """
    if not _X86:
        return ["generic"]
    flags = _cpu_flags()
    return [name for name, (_, needs) in VARIANTS.items() if needs <= flags]


def build_flags(variant: str) -> list[str]:
    """Compiler flags of the ``variant`` build of the quantized kernels (and of the fused decode step, which
    includes them), added to the base flags of :mod:`tgi_nb.models.native`.

    Example:
        >>> "-fopenmp" in build_flags("generic")
        True
    """
    # -fopenmp: libgomp resolves to torch's copy, so the kernel shares torch's thread pool.
    # -fno-associative-math -ffp-contract=off (after the base -ffast-math): the sums are written in the order they
    # must run, FMAs explicitly, and the compiler may not regroup or fuse them differently in the tiles of 8, 4, 2
    # or 1 rows, which would make a sequence's logits depend on how many others share its step.
    return ["-fopenmp", "-Wno-psabi", "-fno-associative-math", "-ffp-contract=off",
            *(VARIANTS[variant][0] if _X86 else [])]


# The products take (x, weight, type or segment count, bias, residual, y, M, N, K, threads, norm, eps, silu_mul):
# the per-row GGML-layout kernel a block array and its GGML type id, the rows16 ones a segment table and its length.
_GEMM_ARGS = ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 3
              + [ctypes.c_int] * 4 + [ctypes.c_void_p, ctypes.c_float, ctypes.c_int])
_DEQUANT_ARGS = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                 ctypes.c_void_p, ctypes.c_int]


def _function(symbol: str, args: list, variant: str) -> native.NativeFunction:
    return native.NativeFunction("quant_gemm", symbol, args, build_flags(variant))


# Per variant: the product and the dequantizer for each layout, the fast product, and the vector width.
KERNELS = {name: {"ggml": (_function("tgi_nb_quant_gemm", _GEMM_ARGS, name),
                           _function("tgi_nb_dequantize", _DEQUANT_ARGS, name)),
                  "rows16": (_function("tgi_nb_quant_gemm_rows16", _GEMM_ARGS, name),
                             _function("tgi_nb_dequantize_rows16", _DEQUANT_ARGS, name)),
                  "rows16_q8": _function("tgi_nb_quant_gemm_rows16_q8", _GEMM_ARGS, name),
                  "width": native.NativeFunction("quant_gemm", "tgi_nb_quant_vector_width", [], build_flags(name))}
           for name in VARIANTS}


def kernel_variant() -> Optional[str]:
    """The kernel variant quantized products run on, or None when they run on torch ops.

    ``TGI_NB_QUANT_KERNEL`` names one (``avx512vnni``, ``avx512``, ``avx2``, ``generic``) or turns them off
    (``0``); otherwise the best this CPU runs whose build succeeds. Read on every call, so a test or notebook can
    switch it.

    Example:
        >>> kernel_variant() in (None, "avx512vnni", "avx512", "avx2", "generic")
        True
    """
    raw = os.environ.get(_SWITCH, "")
    if raw not in _RESOLVED:      # a dict lookup per product; resolving (and building) once per setting
        _RESOLVED[raw] = _resolve_variant(raw.strip().lower())
    return _RESOLVED[raw]


_RESOLVED: dict[str, Optional[str]] = {}


def _resolve_variant(wanted: str) -> Optional[str]:
    if wanted in _DISABLE_VALUES:
        return None
    if wanted:
        if wanted not in VARIANTS:
            raise ValueError(f"{_SWITCH}: must be one of {', '.join(VARIANTS)} or 0, got {wanted!r}")
        if wanted not in runnable_variants():
            raise ValueError(f"{_SWITCH}={wanted}: this CPU cannot run it; it runs {', '.join(runnable_variants())}")
        return wanted if KERNELS[wanted]["width"].get() is not None else None
    for name in runnable_variants():
        if KERNELS[name]["width"].get() is not None:
            return name
    return None


def vector_width(variant: str) -> Optional[int]:
    """Floats per vector register the ``variant`` build computes with (16, 8, 4), or None if it did not build.

    Example:
        >>> vector_width("generic") in (None, 4)
        True
    """
    fn = KERNELS[variant]["width"].get()
    return None if fn is None else fn()
