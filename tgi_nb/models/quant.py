"""GGUF block-quantized weights (Q4_0, Q4_1, Q8_0) kept as stored, and the native kernels that compute with them.

A decode step reads every weight once, so its cost is bytes: the bundled SmolLM2-135M holds its linear layers as
Q4_1 (66 MB) and its tied embedding as Q8_0 (30 MB), 96 MB in all, against 538 MB once dequantized to float32.
:class:`QuantizedTensor` keeps GGML's blocks of 32 weights as they are in the file; ``csrc/quant_gemm.c`` turns
each block into floats in registers and multiplies by float32 activations ("exact" numerics: the dequantized
values are the float32 weights the converted model holds, bit for bit, so only the summation order differs).

The kernel is built once per instruction set and the one this CPU runs best is picked at run time
(:func:`kernel_variant`): ``avx512vnni`` (``avx512`` plus VNNI, for the "fast" numerics of
:func:`quantized_linear`), ``avx512`` (``-march=x86-64-v4``), ``avx2`` (``-march=x86-64-v3``: AVX2, FMA, F16C) or
``generic`` (plain x86-64 SSE2, software fp16; the native flags on other machines). ``TGI_NB_QUANT_KERNEL``
forces one (a benchmark comparing them; a test running each), ``TGI_NB_QUANT_KERNEL=0`` turns the kernels off and
weights are dequantized by torch ops instead.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import native

logger = logging.getLogger("tgi_nb")

# GGML's type ids and block sizes in bytes (32 weights per block).
QTYPE_IDS = {"q4_0": 2, "q4_1": 3, "q8_0": 8}
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}
BLOCK = 32

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


_GEMM_ARGS = ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 3
              + [ctypes.c_int] * 4 + [ctypes.c_void_p, ctypes.c_float, ctypes.c_int])
_DEQUANT_ARGS = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                 ctypes.c_void_p, ctypes.c_int]
# Per variant: the product and the dequantizer for each layout, and the vector width.
_KERNELS = {name: {"ggml": (native.NativeFunction("quant_gemm", "tgi_nb_quant_gemm", _GEMM_ARGS, build_flags(name)),
                            native.NativeFunction("quant_gemm", "tgi_nb_dequantize", _DEQUANT_ARGS,
                                                  build_flags(name))),
                   "rows16": (native.NativeFunction("quant_gemm", "tgi_nb_quant_gemm_rows16", _GEMM_ARGS,
                                                    build_flags(name)),
                              native.NativeFunction("quant_gemm", "tgi_nb_dequantize_rows16", _DEQUANT_ARGS,
                                                    build_flags(name))),
                   "rows16_q8": native.NativeFunction("quant_gemm", "tgi_nb_quant_gemm_rows16_q8", _GEMM_ARGS,
                                                      build_flags(name)),
                   "width": native.NativeFunction("quant_gemm", "tgi_nb_quant_vector_width", [],
                                                  build_flags(name))}
            for name in VARIANTS}
LAYOUTS = ("ggml", "rows16")
NUMERICS = ("exact", "fast")
_SILU_MAX_ROWS = 64   # rows per call of a product with silu_mul (csrc/quant_gemm.c's SILU_MAX_ROWS)
GROUP = 16   # weight rows per group of the rows16 layout


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
        return wanted if _KERNELS[wanted]["width"].get() is not None else None
    for name in runnable_variants():
        if _KERNELS[name]["width"].get() is not None:
            return name
    return None


def vector_width(variant: str) -> Optional[int]:
    """Floats per vector register the ``variant`` build computes with (16, 8, 4), or None if it did not build.

    Example:
        >>> vector_width("generic") in (None, 4)
        True
    """
    fn = _KERNELS[variant]["width"].get()
    return None if fn is None else fn()


@dataclass(slots=True)
class QuantizedTensor:
    """A 2-D weight ``[rows, cols]`` held as GGML blocks of 32 weights.

    ``qtype`` is ``"q4_0"``, ``"q4_1"`` or ``"q8_0"``; ``cols`` is a multiple of 32. ``layout`` says how the blocks
    are arranged in ``data`` (uint8, contiguous):

    - ``"ggml"``, as in the file: ``[rows, cols // 32 * block bytes]``;
    - ``"rows16"``, what the native kernels compute with fastest: the same bytes regrouped 16 rows at a time so that
      vector lanes are rows (``csrc/quant_gemm.c`` describes it), ``[ceil(rows / 16), cols // 32 * 16 * block
      bytes]``, the last group padded with zero blocks. :meth:`to_layout` converts either way, bit for bit.

    Example:
        >>> w = torch.randn(4, 64)
        >>> q = QuantizedTensor.quantize(w, "q8_0")
        >>> q.shape, q.data.shape, (q.dequantize() - w).abs().max().item() < 0.05
        ((4, 64), torch.Size([4, 68]), True)
        >>> p = q.to_layout("rows16")
        >>> p.data.shape, torch.equal(p.dequantize(), q.dequantize()), torch.equal(p.to_layout("ggml").data, q.data)
        (torch.Size([1, 1088]), True, True)
    """

    data: torch.Tensor
    qtype: str
    shape: tuple[int, int]
    layout: str = "ggml"

    def __post_init__(self) -> None:
        if self.qtype not in QTYPE_IDS:
            raise ValueError(f"qtype: must be one of {', '.join(QTYPE_IDS)}, got {self.qtype!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout: must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        rows, cols = self.shape
        if cols % BLOCK:
            raise ValueError(f"shape: columns must be a multiple of {BLOCK}, got {cols}")
        row_bytes = cols // BLOCK * BLOCK_BYTES[self.qtype]
        want = (rows, row_bytes) if self.layout == "ggml" else (-(-rows // GROUP), GROUP * row_bytes)
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != want or not self.data.is_contiguous():
            raise ValueError(f"data: must be contiguous uint8 {want} for {self.qtype} {self.shape} ({self.layout}), "
                             f"got {self.data.dtype} {tuple(self.data.shape)}")

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @staticmethod
    def layout_nbytes(qtype: str, shape: tuple[int, int], layout: str) -> int:
        """Bytes ``data`` takes for a ``qtype`` weight of ``shape`` in ``layout`` (rows16 pads to 16 rows)."""
        rows, cols = shape
        rows = rows if layout == "ggml" else -(-rows // GROUP) * GROUP
        return rows * (cols // BLOCK) * BLOCK_BYTES[qtype]

    @classmethod
    def quantize(cls, weight: torch.Tensor, qtype: str) -> "QuantizedTensor":
        """Quantize a float ``[rows, cols]`` weight into blocks with gguf's reference quantizer (llama.cpp's)."""
        from gguf import GGMLQuantizationType, quants

        if qtype not in QTYPE_IDS:
            raise ValueError(f"qtype: must be one of {', '.join(QTYPE_IDS)}, got {qtype!r}")
        blocks = quants.quantize(weight.detach().float().cpu().numpy(), GGMLQuantizationType[qtype.upper()])
        return cls(torch.from_numpy(np.ascontiguousarray(blocks)), qtype, tuple(weight.shape))

    def to_layout(self, layout: str, out: Optional[torch.Tensor] = None) -> "QuantizedTensor":
        """The same blocks in ``layout`` (``self`` if already there); ``out``: where to write the new ``data``
        (a uint8 tensor of :meth:`layout_nbytes` elements, e.g. in a weight arena)."""
        if layout not in LAYOUTS:
            raise ValueError(f"layout: must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        if layout == self.layout:
            return self
        rows, cols = self.shape
        blocks, bb = cols // BLOCK, BLOCK_BYTES[self.qtype]
        groups = -(-rows // GROUP)
        # A block's fields: the scale d (2 bytes), the min m (Q4_1, 2 bytes), the quants (16 or 32 bytes) taken
        # as uint32 words; rows16 puts 16 rows' d side by side, then their m, then word w of each row in turn.
        head = 4 if self.qtype == "q4_1" else 2
        words = (bb - head) // 4
        if layout == "rows16":
            src = self.data
            if groups * GROUP != rows:
                src = torch.cat([src, src.new_zeros(groups * GROUP - rows, src.shape[1])])
            per_block = src.view(groups, GROUP, blocks, bb).transpose(1, 2)          # [g, b, row, byte]
            fields = [per_block[..., :2].reshape(groups, blocks, 2 * GROUP)]
            if head == 4:
                fields.append(per_block[..., 2:4].reshape(groups, blocks, 2 * GROUP))
            fields.append(per_block[..., head:].reshape(groups, blocks, GROUP, words, 4).transpose(2, 3)
                          .reshape(groups, blocks, GROUP * (bb - head)))
            shape = (groups, blocks * GROUP * bb)
        else:
            packed = self.data.view(groups, blocks, GROUP * bb)
            fields = [packed[..., :2 * GROUP].reshape(groups, blocks, GROUP, 2)]
            if head == 4:
                fields.append(packed[..., 2 * GROUP:4 * GROUP].reshape(groups, blocks, GROUP, 2))
            fields.append(packed[..., head * GROUP:].reshape(groups, blocks, words, GROUP, 4).transpose(2, 3)
                          .reshape(groups, blocks, GROUP, bb - head))
            shape = (rows, blocks * bb)
        data = torch.cat(fields, dim=-1)
        if layout == "ggml":
            data = data.transpose(1, 2).reshape(groups * GROUP, blocks * bb)[:rows]
        data = data.reshape(shape)
        if out is None:
            out = torch.empty(shape, dtype=torch.uint8)
        else:
            out = out.view(shape)
        out.copy_(data)
        return QuantizedTensor(out, self.qtype, self.shape, layout)

    def dequantize(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """float32 ``[rows, cols]`` (or just the given row ids, an embedding lookup), bit-equal to gguf's
        ``quants.dequantize``."""
        n, k = self.shape
        count = n if rows is None else rows.numel()
        out = torch.empty(count, k, dtype=torch.float32)
        variant = kernel_variant()
        if variant is not None:
            ids = None if rows is None else rows.reshape(-1).to(torch.int64).contiguous()
            rc = _KERNELS[variant][self.layout][1].get()(
                self.data.data_ptr(), QTYPE_IDS[self.qtype], n, k, None if ids is None else ids.data_ptr(), count,
                out.data_ptr(), torch.get_num_threads())
            if rc:
                raise IndexError(f"row ids out of range [0, {n})")
            return out
        if self.layout != "ggml":
            return self.to_layout("ggml").dequantize(rows)
        data = self.data if rows is None else self.data[rows.reshape(-1)]
        return _torch_dequantize(data, self.qtype, k)


def _torch_dequantize(data: torch.Tensor, qtype: str, cols: int) -> torch.Tensor:
    # The fallback when no kernel builds: the same arithmetic as gguf's numpy dequantize, in torch ops.
    blocks = data.reshape(-1, BLOCK_BYTES[qtype])
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    if qtype == "q8_0":
        w = d * blocks[:, 2:].contiguous().view(torch.int8).float()
    else:
        qs = blocks[:, 4 if qtype == "q4_1" else 2:]
        q = torch.cat([qs & 15, qs >> 4], dim=1).float()
        w = d * q + blocks[:, 2:4].contiguous().view(torch.float16).float() if qtype == "q4_1" else d * (q - 8)
    return w.reshape(data.shape[0], cols)


def quantized_linear(x: torch.Tensor, weight: QuantizedTensor, bias: Optional[torch.Tensor] = None,
                     residual: Optional[torch.Tensor] = None, *, norm: Optional[tuple[torch.Tensor, float]] = None,
                     silu_mul: bool = False, variant: Optional[str] = None,
                     numerics: str = "exact") -> Optional[torch.Tensor]:
    """``linear()``'s contract for a quantized weight and float32 CPU ``x``, on the native kernel (``variant``,
    default :func:`kernel_variant`); None when no kernel is available (the caller then dequantizes). Any number of
    rows (``silu_mul`` in chunks of 64); :func:`kernel_takes_large_batches` says when more than 64 pay. See :func:`tgi_nb.models.linear.linear` for ``norm`` and ``silu_mul``.

    ``numerics``:

    - ``"exact"``: quantized weights times float32 activations (each dequantized weight is the float32 value
      gguf's dequantizer gives; only the summation order differs from a float matmul);
    - ``"fast"``: llama.cpp's: each row of ``x`` (after ``norm``) is quantized to int8 per block of 32 (Q8_0, as
      llama.cpp's ``quantize_row_q8_0``) and each block's product is an integer dot product (AVX-512 VNNI's
      ``dpbusd``; ``maddubs`` on AVX2), scaled per block. Several times fewer instructions per weight; the cost
      is the activations' rounding (about 1% relative error on the output of random data). Computed on the
      rows16 layout (a ggml-layout weight is converted first: convert at load to avoid that per call), for any
      number of rows (``silu_mul``: in chunks of 64). Each row's result does not depend on the others.

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
    out = torch.empty(rows, n // 2 if silu_mul else n, dtype=torch.float32)
    if residual is not None:
        residual = residual.contiguous()
    norm_weight, eps = norm if norm is not None else (None, 0.0)
    if numerics == "exact":
        if weight.layout == "rows16" and silu_mul and n % (2 * GROUP):
            weight = weight.to_layout("ggml")          # the up half must start on a group; the loader avoids this
        kernel = _KERNELS[variant][weight.layout][0]
    else:
        weight = weight.to_layout("rows16")
        kernel = _KERNELS[variant]["rows16_q8"]
        if silu_mul and n % (2 * GROUP):
            # The up half does not start on a group: the whole product, then silu_mul in torch.
            both = torch.empty(rows, n, dtype=torch.float32)
            _run_kernel(kernel, x, weight, bias, None, both, norm_weight, eps, False)
            return torch.nn.functional.silu(both[:, :n // 2]) * both[:, n // 2:]
    # Any number of rows, except with silu_mul, whose per-thread scratch holds 64.
    step = _SILU_MAX_ROWS if silu_mul else max(rows, 1)
    for start in range(0, max(rows, 1), step):
        stop = min(start + step, rows)
        _run_kernel(kernel, x[start:stop], weight, bias, None if residual is None else residual[start:stop],
                    out[start:stop], norm_weight, eps, silu_mul)
    return out


def kernel_takes_large_batches(weight: QuantizedTensor, numerics: str = "exact") -> bool:
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


def _run_kernel(kernel: native.NativeFunction, x: torch.Tensor, weight: QuantizedTensor, bias: Optional[torch.Tensor],
                residual: Optional[torch.Tensor], out: torch.Tensor, norm_weight: Optional[torch.Tensor], eps: float,
                silu_mul: bool) -> None:
    n, k = weight.shape
    rc = kernel.get()(
        x.data_ptr(), weight.data.data_ptr(), QTYPE_IDS[weight.qtype],
        bias.data_ptr() if bias is not None else None, residual.data_ptr() if residual is not None else None,
        out.data_ptr(), x.shape[0], n, k, torch.get_num_threads(),
        norm_weight.data_ptr() if norm_weight is not None else None, eps, int(silu_mul))
    if rc == 1:
        raise MemoryError("the quantized linear kernel could not allocate its scratch buffer")
    if rc:
        raise ValueError(f"the quantized linear kernel refused rows={x.shape[0]}, "
                         f"weight {weight.qtype} {weight.shape}")


# ---------------------------------------------------------------------------------------------- GGUF files
# GGUF tensor names of a Llama-family block -> the transformers names our loader uses.
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Architectures whose GGUF tensors map onto LlamaModel's; llama.cpp's converter permutes llama's q/k rows.
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")


def _hf_name(gguf_name: str) -> Optional[str]:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_GGUF_LAYER_NAMES[parts[2]]}.weight"
    return None


def _unpermute_rows(rows: int, n_head: int) -> torch.Tensor:
    # transformers' reverse of convert_hf_to_gguf's permute, applied to row indices: whole rows move, blocks intact.
    idx = torch.arange(rows)
    return idx.reshape(n_head, rows // n_head // 2, 2).transpose(1, 2).reshape(rows)


_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_tensor_table(gguf_file: str | Path) -> tuple[str, list[tuple[str, int, tuple[int, ...], int]]]:
    """The architecture and tensor table of a GGUF file: ``(name, GGML type id, dims innermost first, absolute
    byte offset)`` per tensor. A lean reader of the header only: gguf's ``GGUFReader`` builds every metadata
    field (a 49k-token vocabulary: tens of seconds on a busy 2-core machine); this skips what it does not need.

    Example:
        >>> from tgi_nb.models.loader import bundled_gguf_path
        >>> arch, table = read_gguf_tensor_table(bundled_gguf_path())     # doctest: +SKIP
        >>> arch, table[0][:3]                                            # doctest: +SKIP
        ('llama', ('token_embd.weight', 8, (576, 49152)))
    """
    import struct

    with open(gguf_file, "rb") as f:
        buf = memoryview(f.read(64 << 20))     # metadata and tensor table; a vocabulary of 250k tokens is ~5 MB
    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string() -> str:
        nonlocal pos
        length = take("Q")
        pos += length
        return bytes(buf[pos - length:pos]).decode("utf-8", errors="replace")

    def skip(vtype: int) -> None:
        nonlocal pos
        if vtype == _GGUF_STRING:
            length = take("Q")          # not `pos += take(...)`: that adds to pos as it was before the read
            pos += length
        elif vtype == _GGUF_ARRAY:
            item_type, count = take("IQ")
            if item_type in _GGUF_SCALAR_SIZES:
                pos += count * _GGUF_SCALAR_SIZES[item_type]
            else:
                for _ in range(count):
                    skip(item_type)
        elif vtype in _GGUF_SCALAR_SIZES:
            pos += _GGUF_SCALAR_SIZES[vtype]
        else:
            raise ValueError(f"{gguf_file}: unknown GGUF value type {vtype}")

    if bytes(buf[:4]) != b"GGUF":
        raise ValueError(f"{gguf_file}: not a GGUF file (magic {bytes(buf[:4])!r})")
    pos = 4
    version, n_tensors, n_kv = take("IQQ")
    if version < 2:
        raise ValueError(f"{gguf_file}: GGUF version {version} is not supported (2 or later)")
    arch, alignment = "", 32
    for _ in range(n_kv):
        key, vtype = string(), take("I")
        if key == "general.architecture" and vtype == _GGUF_STRING:
            arch = string()
        elif key == "general.alignment" and vtype == 4:
            alignment = take("I")
        else:
            skip(vtype)
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = tuple(take("Q") for _ in range(take("I")))
        qtype, offset = take("IQ")
        infos.append((name, qtype, dims, offset))
    data_start = -(-pos // alignment) * alignment
    return arch, [(name, qtype, dims, data_start + offset) for name, qtype, dims, offset in infos]


def read_gguf_quantized(gguf_file: str | Path, num_heads: int, num_kv_heads: int) -> dict[str, QuantizedTensor]:
    """The Q4_0 / Q4_1 / Q8_0 linear and embedding tensors of a Llama-family GGUF file, under transformers'
    names, as stored (q/k rows un-permuted as transformers does). Other types (F32 norms, K-quants) are left
    out: the loader takes those from the converted float32 model. An architecture outside
    :data:`GGUF_ARCHITECTURES` gives an empty dict.

    Example:
        >>> from tgi_nb.models.loader import bundled_gguf_path
        >>> q = read_gguf_quantized(bundled_gguf_path(), 9, 3)          # doctest: +SKIP
        >>> q["model.layers.0.mlp.down_proj.weight"].qtype, q["model.embed_tokens.weight"].qtype  # doctest: +SKIP
        ('q4_1', 'q8_0')
    """
    arch, table = read_gguf_tensor_table(gguf_file)
    if arch not in GGUF_ARCHITECTURES:
        logger.info("GGUF architecture %r: weights are dequantized at load", arch)
        return {}
    names = {qid: name for name, qid in QTYPE_IDS.items()}
    file = np.memmap(gguf_file, dtype=np.uint8, mode="r")
    out = {}
    for gguf_name, type_id, dims, offset in table:
        name = _hf_name(gguf_name)
        if name is None or type_id not in names or len(dims) != 2:
            continue
        qtype = names[type_id]
        cols, rows = dims                                    # GGUF lists dimensions innermost first
        row_bytes = cols // BLOCK * BLOCK_BYTES[qtype]
        data = torch.from_numpy(np.array(file[offset:offset + rows * row_bytes])).reshape(rows, row_bytes)
        if arch == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            heads = num_heads if ".attn_q." in gguf_name else num_kv_heads
            data = data[_unpermute_rows(rows, heads)].contiguous()
        out[name] = QuantizedTensor(data, qtype, (rows, cols))
    return out
