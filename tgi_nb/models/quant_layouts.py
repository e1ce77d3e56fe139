"""The rows16 layout of GGML blocks: the same bytes regrouped 16 weight rows at a time so that vector lanes are
rows (``csrc/quant_gemm.c`` describes it; ``csrc/quant_types.h`` lists each type's fields).

Per group of 16 rows and per block of columns, each field of the block (:data:`FIELDS`: GGML byte offset, size,
unit) holds the 16 rows' units side by side: fp16 values (unit 2) as 16 halves, quants and packed scales (unit 4)
as chunks of 16 uint32, chunk ``c`` lane ``j`` = bytes ``4c..4c+3`` of row ``j``'s field. A field at GGML offset
``o`` therefore starts at ``16 o`` of the group's block. Conversions both ways move bytes only.
"""

from __future__ import annotations

import torch

GROUP = 16   # weight rows per group of the rows16 layout

# Each type's block fields, in GGML's order: (byte offset, size, unit), as csrc/quant_types.h's block_fields.
FIELDS = {
    "q4_0": ((0, 2, 2), (2, 16, 4)),
    "q4_1": ((0, 2, 2), (2, 2, 2), (4, 16, 4)),
    "q5_0": ((0, 2, 2), (2, 4, 4), (6, 16, 4)),
    "q5_1": ((0, 2, 2), (2, 2, 2), (4, 4, 4), (8, 16, 4)),
    "q8_0": ((0, 2, 2), (2, 32, 4)),
    "q4_k": ((0, 2, 2), (2, 2, 2), (4, 12, 4), (16, 128, 4)),
    "q5_k": ((0, 2, 2), (2, 2, 2), (4, 12, 4), (16, 32, 4), (48, 128, 4)),
    "q6_k": ((0, 128, 4), (128, 64, 4), (192, 16, 4), (208, 2, 2)),
}


def to_rows16(data: torch.Tensor, qtype: str, rows: int, blocks: int) -> torch.Tensor:
    """GGML-layout ``data`` (``[rows, blocks * block bytes]`` uint8) regrouped: ``[ceil(rows / 16), blocks * 16 *
    block bytes]``, the last group padded with zero blocks.

    Example:
        >>> data = torch.arange(2 * 18, dtype=torch.uint8).view(2, 18)     # two Q4_0 rows of one block
        >>> out = to_rows16(data, "q4_0", 2, 1)
        >>> out.shape, out[0, :4].tolist()                                   # row 0's d, then row 1's
        (torch.Size([1, 288]), [0, 1, 18, 19])
    """
    fields = FIELDS[qtype]
    bb = sum(size for _, size, _ in fields)
    groups = -(-rows // GROUP)
    if groups * GROUP != rows:
        data = torch.cat([data, data.new_zeros(groups * GROUP - rows, data.shape[1])])
    per_block = data.view(groups, GROUP, blocks, bb).transpose(1, 2)          # [group, block, row, byte]
    parts = [per_block[..., off:off + size].reshape(groups, blocks, GROUP, size // unit, unit).transpose(2, 3)
             .reshape(groups, blocks, GROUP * size) for off, size, unit in fields]
    return torch.cat(parts, dim=-1).reshape(groups, blocks * GROUP * bb)


def from_rows16(data: torch.Tensor, qtype: str, rows: int, blocks: int) -> torch.Tensor:
    """The inverse of :func:`to_rows16`: ``[rows, blocks * block bytes]``.

    Example:
        >>> data = torch.arange(2 * 18, dtype=torch.uint8).view(2, 18)
        >>> torch.equal(from_rows16(to_rows16(data, "q4_0", 2, 1), "q4_0", 2, 1), data)
        True
    """
    fields = FIELDS[qtype]
    bb = sum(size for _, size, _ in fields)
    groups = data.shape[0]
    packed = data.view(groups, blocks, GROUP * bb)
    parts = [packed[..., GROUP * off:GROUP * (off + size)].reshape(groups, blocks, size // unit, GROUP, unit)
             .transpose(2, 3).reshape(groups, blocks, GROUP, size) for off, size, unit in fields]
    out = torch.cat(parts, dim=-1).transpose(1, 2).reshape(groups * GROUP, blocks * bb)
    return out[:rows]
