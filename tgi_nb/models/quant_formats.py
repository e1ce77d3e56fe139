"""GGUF block-quantized weights as tensors: the GGML types tgi_nb keeps as stored, and :class:`QuantizedTensor`.

A decode step reads every weight once, so its cost is bytes: a Q4_K_M file holds its weights in 4.5 to 6.6 bits
each, against 32 once dequantized to float32. :class:`QuantizedTensor` keeps GGML's blocks as they are in the file
(or regrouped 16 rows at a time, :mod:`tgi_nb.models.quant_layouts`) and :mod:`tgi_nb.models.quant` computes with
them; :class:`QuantizedStack` stacks blocks of different types into one fused weight (a q|k|v whose v is Q6_K).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from . import quant_layouts
from .quant_kernels import KERNELS, kernel_variant
from .quant_layouts import GROUP

# GGML's type ids, weights per block and bytes per block of the types kept as stored.
QTYPE_IDS = {"q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q4_k": 12, "q5_k": 13, "q6_k": 14}
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24, "q8_0": 34, "q4_k": 144, "q5_k": 176, "q6_k": 210}
BLOCK_WEIGHTS = {name: 256 if name.endswith("_k") else 32 for name in QTYPE_IDS}
BLOCK = 32            # the smallest block: every quantized weight's columns are a multiple of it
LAYOUTS = ("ggml", "rows16")


def _check(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: must be one of {', '.join(allowed)}, got {value!r}")


@dataclass(slots=True)
class QuantizedTensor:
    """A 2-D weight ``[rows, cols]`` held as GGML blocks.

    ``qtype`` is one of :data:`QTYPE_IDS` (``"q4_0"``, ``"q4_1"``, ``"q5_0"``, ``"q5_1"``, ``"q8_0"``: blocks of
    32 weights; ``"q4_k"``, ``"q5_k"``, ``"q6_k"``: superblocks of 256); ``cols`` is a multiple of the block.
    ``layout`` says how the blocks are arranged in ``data`` (uint8, contiguous):

    - ``"ggml"``, as in the file: ``[rows, cols // block weights * block bytes]``;
    - ``"rows16"``, what the native kernels compute with: the same bytes regrouped 16 rows at a time so that vector
      lanes are rows (:mod:`tgi_nb.models.quant_layouts`), ``[ceil(rows / 16), 16 * row bytes]``, the last group
      padded with zero blocks. :meth:`to_layout` converts either way, bit for bit.

    Example:
        >>> w = torch.randn(4, 64)
        >>> q = QuantizedTensor.quantize(w, "q8_0")
        >>> q.shape, q.data.shape, (q.dequantize() - w).abs().max().item() < 0.05
        ((4, 64), torch.Size([4, 68]), True)
        >>> p = q.to_layout("rows16")
        >>> p.data.shape, torch.equal(p.dequantize(), q.dequantize()), torch.equal(p.to_layout("ggml").data, q.data)
        (torch.Size([1, 1088]), True, True)
        >>> QuantizedTensor.quantize(torch.randn(2, 256), "q4_k").data.shape
        torch.Size([2, 144])
    """

    data: torch.Tensor
    qtype: str
    shape: tuple[int, int]
    layout: str = "ggml"
    _segments: Optional[torch.Tensor] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check("qtype", self.qtype, QTYPE_IDS)
        _check("layout", self.layout, LAYOUTS)
        rows, cols = self.shape
        if cols % BLOCK_WEIGHTS[self.qtype]:
            raise ValueError(f"shape: columns must be a multiple of {BLOCK_WEIGHTS[self.qtype]} for {self.qtype}, "
                             f"got {cols}")
        row_bytes = cols // BLOCK_WEIGHTS[self.qtype] * BLOCK_BYTES[self.qtype]
        want = (rows, row_bytes) if self.layout == "ggml" else (-(-rows // GROUP), GROUP * row_bytes)
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != want or not self.data.is_contiguous():
            raise ValueError(f"data: must be contiguous uint8 {want} for {self.qtype} {self.shape} ({self.layout}), "
                             f"got {self.data.dtype} {tuple(self.data.shape)}")

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def parts(self) -> tuple["QuantizedTensor", ...]:
        """The single-type blocks this weight is made of: itself (see :class:`QuantizedStack`)."""
        return (self,)

    @staticmethod
    def layout_nbytes(qtype: str, shape: tuple[int, int], layout: str) -> int:
        """Bytes ``data`` takes for a ``qtype`` weight of ``shape`` in ``layout`` (rows16 pads to 16 rows)."""
        rows, cols = shape
        rows = rows if layout == "ggml" else -(-rows // GROUP) * GROUP
        return rows * (cols // BLOCK_WEIGHTS[qtype]) * BLOCK_BYTES[qtype]

    @classmethod
    def quantize(cls, weight: torch.Tensor, qtype: str) -> "QuantizedTensor":
        """Quantize a float ``[rows, cols]`` weight into blocks: with gguf's reference quantizer (llama.cpp's) for
        the 32-weight types, with :func:`quantize_k` (a plain min/max one) for the K-quants."""
        _check("qtype", qtype, QTYPE_IDS)
        array = weight.detach().float().cpu().numpy()
        if qtype in K_QTYPES:
            blocks = quantize_k(array, qtype)
        else:
            from gguf import GGMLQuantizationType, quants

            blocks = quants.quantize(array, GGMLQuantizationType[qtype.upper()])
        return cls(torch.from_numpy(np.ascontiguousarray(blocks)), qtype, tuple(weight.shape))

    def to_layout(self, layout: str, out: Optional[torch.Tensor] = None) -> "QuantizedTensor":
        """The same blocks in ``layout`` (``self`` if already there); ``out``: where to write the new ``data``
        (a uint8 tensor of :meth:`layout_nbytes` elements, e.g. in a weight arena)."""
        _check("layout", layout, LAYOUTS)
        if layout == self.layout:
            return self
        rows, cols = self.shape
        blocks = cols // BLOCK_WEIGHTS[self.qtype]
        convert = quant_layouts.to_rows16 if layout == "rows16" else quant_layouts.from_rows16
        data = convert(self.data, self.qtype, rows, blocks)
        out = data.contiguous() if out is None else out.view(data.shape).copy_(data)
        return QuantizedTensor(out, self.qtype, self.shape, layout)

    def dequantize(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """float32 ``[rows, cols]`` (or just the given row ids, an embedding lookup), bit-equal to gguf's
        ``quants.dequantize``."""
        n, k = self.shape
        count = n if rows is None else rows.numel()
        variant = kernel_variant()
        if variant is not None:
            out = torch.empty(count, k, dtype=torch.float32)
            ids = None if rows is None else rows.reshape(-1).to(torch.int64).contiguous()
            rc = KERNELS[variant][self.layout][1].get()(
                self.data.data_ptr(), QTYPE_IDS[self.qtype], n, k, None if ids is None else ids.data_ptr(), count,
                out.data_ptr(), torch.get_num_threads())
            if rc:
                raise IndexError(f"row ids out of range [0, {n})")
            return out
        if self.layout != "ggml":
            return self.to_layout("ggml").dequantize(rows)
        from gguf import GGMLQuantizationType, quants

        data = self.data if rows is None else self.data[rows.reshape(-1)]
        return torch.from_numpy(quants.dequantize(data.numpy(), GGMLQuantizationType[self.qtype.upper()]))

    def segments(self) -> torch.Tensor:
        """The kernels' description of this rows16 weight: int64 ``[1, 3]`` (address, GGML type id, rows)."""
        if self.layout != "rows16":
            raise ValueError(f"layout: segments describe rows16 weights, got {self.layout!r}")
        if self._segments is None:
            self._segments = torch.tensor([[self.data.data_ptr(), QTYPE_IDS[self.qtype], self.shape[0]]],
                                          dtype=torch.int64)
        return self._segments


@dataclass(slots=True)
class QuantizedStack:
    """Rows16 weights of different types stacked along the rows into one weight: a fused q|k|v whose v is Q6_K
    and q, k Q4_K (llama.cpp's Q4_K_M), or parts whose rows are not multiples of 16. The kernels take the stack in
    one call (each part is a segment of their weight table).

    Example:
        >>> q = QuantizedTensor.quantize(torch.randn(32, 256), "q4_k").to_layout("rows16")
        >>> v = QuantizedTensor.quantize(torch.randn(16, 256), "q6_k").to_layout("rows16")
        >>> s = QuantizedStack((q, v))
        >>> s.shape, s.qtype, s.dequantize().shape
        ((48, 256), 'q4_k+q6_k', torch.Size([48, 256]))
    """

    parts: tuple[QuantizedTensor, ...]
    _segments: Optional[torch.Tensor] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.parts or any(p.layout != "rows16" for p in self.parts):
            raise ValueError("parts: must be one or more rows16 QuantizedTensors")
        if len({p.shape[1] for p in self.parts}) != 1:
            raise ValueError(f"parts: must have the same columns, got {[p.shape for p in self.parts]}")

    @property
    def shape(self) -> tuple[int, int]:
        return sum(p.shape[0] for p in self.parts), self.parts[0].shape[1]

    @property
    def qtype(self) -> str:
        return "+".join(dict.fromkeys(p.qtype for p in self.parts))

    @property
    def layout(self) -> str:
        return "rows16"

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def dequantize(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        whole = torch.cat([p.dequantize() for p in self.parts])
        return whole if rows is None else whole[rows.reshape(-1)]

    def segments(self) -> torch.Tensor:
        if self._segments is None:
            self._segments = torch.cat([p.segments() for p in self.parts])
        return self._segments


# ------------------------------------------------------------------------------------------- K-quant blocks
K_QTYPES = ("q4_k", "q5_k", "q6_k")


def _half(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fp16 bytes of ``values`` and the float32 values they hold."""
    h = values.astype(np.float16)
    return h.view(np.uint8).reshape(*values.shape, 2), h.astype(np.float32)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num), where=den != 0)


def quantize_k(weight: np.ndarray, qtype: str) -> np.ndarray:
    """Blocks of ``qtype`` (``"q4_k"``, ``"q5_k"``, ``"q6_k"``) for a float32 ``[rows, cols]`` array (cols a
    multiple of 256), GGML's byte layout (``csrc/quant_types.h``). A plain quantizer: each sub-block's scale and
    min from its range, the 6- or 8-bit scales from the largest; llama.cpp's searches for better ones, which only
    changes the values, not how they are stored or computed with (gguf's Python package has no K-quant quantizer).

    Example:
        >>> w = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
        >>> quantize_k(w, "q6_k").shape
        (2, 210)
    """
    _check("qtype", qtype, K_QTYPES)
    rows, cols = weight.shape
    if cols % 256:
        raise ValueError(f"weight: columns must be a multiple of 256 for {qtype}, got {cols}")
    n = rows * cols // 256
    if qtype == "q6_k":
        x = weight.reshape(n, 16, 16).astype(np.float32)
        scale = np.abs(x).max(-1) / 31                                          # [n, 16]
        d_bytes, d = _half(scale.max(-1) / 127)
        sc = np.clip(np.rint(_ratio(scale, d[:, None].repeat(16, 1))), -128, 127).astype(np.int8)
        eff = (d[:, None] * sc)[..., None]
        q = (np.clip(np.rint(_ratio(x, np.broadcast_to(eff, x.shape))), -32, 31) + 32).astype(np.uint8)
        q = q.reshape(n, 2, 4, 32)                                               # [n, half, k, l]
        ql = np.concatenate([q[:, :, 0] & 15 | (q[:, :, 2] & 15) << 4, q[:, :, 1] & 15 | (q[:, :, 3] & 15) << 4],
                            axis=-1).reshape(n, 128)
        qh = (q[:, :, 0] >> 4 | (q[:, :, 1] >> 4) << 2 | (q[:, :, 2] >> 4) << 4 | (q[:, :, 3] >> 4) << 6).reshape(n, 64)
        return np.concatenate([ql, qh, sc.view(np.uint8), d_bytes], axis=1).reshape(rows, -1)
    levels = 15 if qtype == "q4_k" else 31
    x = weight.reshape(n, 8, 32).astype(np.float32)
    low = np.minimum(x.min(-1), 0)
    scale, mins = (x.max(-1) - low) / levels, -low                               # [n, 8], mins >= 0
    d_bytes, d = _half(scale.max(-1) / 63)
    m_bytes, dmin = _half(mins.max(-1) / 63)
    sc = np.clip(np.rint(_ratio(scale, d[:, None].repeat(8, 1))), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(_ratio(mins, dmin[:, None].repeat(8, 1))), 0, 63).astype(np.uint8)
    eff, off = (d[:, None] * sc)[..., None], (dmin[:, None] * mn)[..., None]
    q = np.clip(np.rint(_ratio(x + off, np.broadcast_to(eff, x.shape))), 0, levels).astype(np.uint8)
    scales = np.concatenate([sc[:, :4] | (sc[:, 4:] >> 4) << 6, mn[:, :4] | (mn[:, 4:] >> 4) << 6,
                             (sc[:, 4:] & 15) | (mn[:, 4:] & 15) << 4], axis=1)
    pairs = q.reshape(n, 4, 2, 32)
    qs = ((pairs[:, :, 0] & 15) | (pairs[:, :, 1] & 15) << 4).reshape(n, 128)
    fields = [d_bytes, m_bytes, scales]
    if qtype == "q5_k":
        fields.append(sum((q[:, j] >> 4) << j for j in range(8)).astype(np.uint8))
    return np.concatenate([*fields, qs], axis=1).reshape(rows, -1)
