"""A GPU step's inputs, built on the host in one preallocated (pinned) buffer and copied to the device at once.

Small host->device copies each cost a launch and, from pageable memory, a synchronisation; a step that makes a
tensor per field (and per sequence) spends its time there. :class:`HostBuffer` packs every field of a step
(token ids, positions, KV slots, sequence lengths, block tables, sampling parameters, grammar bitmasks) into one
int32 staging tensor, pinned when the device is CUDA, with float32 fields bit-cast into it and int64 fields
aligned on 8 bytes; :meth:`HostBuffer.to_device` issues one non-blocking copy and returns device views of each
field. :class:`StepPacker` fills one with a scheduled step, the layout the GPU forward and
:func:`tgi_nb.models.triton_attention.paged_attention` take.

On the CPU nothing is copied: the views are of the staging tensor itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import torch

from .sequence import Sequence

_NUMPY = {torch.int32: np.int32, torch.float32: np.float32, torch.int64: np.int64}


@dataclass(frozen=True, slots=True)
class Field:
    """Where one field lies in a :class:`HostBuffer`: offset in int32 words, shape, dtype."""

    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def words(self) -> int:
        return math.prod(self.shape) * (2 if self.dtype == torch.int64 else 1)


class HostBuffer:
    """A growable int32 staging buffer on the host, copied to ``device`` in one non-blocking copy per step.

    Example:
        >>> buf = HostBuffer(torch.device("cpu"))
        >>> ids = buf.add([5, 6, 7], torch.int32)
        >>> temps = buf.add([0.5, 1.0], torch.float32)
        >>> slots = buf.add([2**40], torch.int64)
        >>> views = buf.to_device()
        >>> views[ids].tolist(), views[temps].tolist(), views[slots].tolist()
        ([5, 6, 7], [0.5, 1.0], [1099511627776])
    """

    def __init__(self, device: torch.device, capacity: int = 1 << 16):
        self.device = torch.device(device)
        self._pinned = self.device.type == "cuda"
        self._host = self._new_host(capacity)
        self._device_buf: Optional[torch.Tensor] = None
        self._used = 0
        self._copied: Optional[torch.cuda.Event] = None

    def _new_host(self, words: int) -> torch.Tensor:
        return torch.empty(words, dtype=torch.int32, pin_memory=self._pinned)

    def reset(self) -> None:
        """Start a new step's fields. Waits for the previous step's copy to have read the staging memory (it
        has, whenever the step's one device->host synchronisation came after it)."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
        self._used = 0

    def allocate(self, shape: int | tuple[int, ...], dtype: torch.dtype) -> Field:
        """Reserve a field (write it through :meth:`host` once every field of the step is allocated: growing the
        buffer moves it, and a view taken before that would write to the old memory)."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        offset = self._used + (self._used & 1 if dtype == torch.int64 else 0)   # int64 on 8 bytes
        field = Field(offset, shape, dtype)
        end = offset + field.words
        if end > self._host.numel():
            grown = self._new_host(max(end, 2 * self._host.numel()))
            grown[:self._used].copy_(self._host[:self._used])
            self._host = grown
        self._used = end
        return field

    def add(self, values: Iterable | np.ndarray, dtype: torch.dtype) -> Field:
        """Append a 1-D field holding ``values``."""
        values = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=_NUMPY[dtype])
        field = self.allocate(values.shape, dtype)
        self.host(field)[...] = values
        return field

    def host(self, field: Field) -> np.ndarray:
        """A writable numpy view of the field's host memory."""
        words = self._host[field.offset:field.offset + field.words].numpy()
        return words.view(_NUMPY[field.dtype]).reshape(field.shape)

    def to_device(self) -> "DeviceViews":
        """Copy the fields added since :meth:`reset` to the device (one copy, non-blocking from pinned memory)."""
        if self.device.type == "cpu":
            return DeviceViews(self._host)
        if self._device_buf is None or self._device_buf.numel() < self._used:
            self._device_buf = torch.empty(self._host.numel(), dtype=torch.int32, device=self.device)
        self._device_buf[:self._used].copy_(self._host[:self._used], non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return DeviceViews(self._device_buf)


class DeviceViews:
    """The device side of a :class:`HostBuffer`: ``views[field]`` is that field's tensor."""

    __slots__ = ("_words",)

    def __init__(self, words: torch.Tensor):
        self._words = words

    def __getitem__(self, field: Field) -> torch.Tensor:
        words = self._words[field.offset:field.offset + field.words]
        return (words if field.dtype == torch.int32 else words.view(field.dtype)).view(field.shape)


@dataclass(slots=True)
class StepLayout:
    """The fields of one step in its :class:`HostBuffer` and the host-side facts the forward needs."""

    input_ids: Field          # int32 [num_tokens], decodes first, then prefill chunks
    positions: Field          # int32 [num_tokens]
    slot_mapping: Field       # int64 [num_tokens], block * block_size + offset of each token's K/V
    seq_lens: Field           # int32 [num_seqs], tokens of each sequence including this step's
    query_start_loc: Field    # int32 [num_seqs + 1]
    block_tables: Field       # int32 [num_seqs, max_blocks]
    logits_indices: Field     # int64 [num_sampling], the rows that are last tokens of a sequence's known tokens
    num_tokens: int
    num_decodes: int
    max_query_len: int


class StepPacker:
    """Builds a step's packed inputs into a :class:`HostBuffer` (numpy on the host, no tensor per sequence).

    ``block_table_width`` fixes the block tables' width (a CUDA graph needs it fixed): the blocks of the longest
    sequence the cache allows. Rows of sequences with fewer blocks are padded with block 0, never read.

    Example:
        >>> from tgi_nb.engine.sequence import Request
        >>> from tgi_nb.engine.sampling_params import SamplingParams
        >>> req = Request("r", [1, 2, 3, 4, 5], SamplingParams(), lambda _: None, 0.0)
        >>> seq = Sequence(req, 0, [1, 2, 3, 4, 5], None, None)
        >>> seq.block_table = [7, 3]
        >>> inputs = StepPacker(torch.device("cpu"), block_size=4, block_table_width=4)
        >>> layout = inputs.build(decodes=[], prefills=[(seq, 5)])
        >>> views = inputs.buffer.to_device()
        >>> views[layout.slot_mapping].tolist(), views[layout.block_tables].tolist()
        ([28, 29, 30, 31, 12], [[7, 3, 0, 0]])
    """

    def __init__(self, device: torch.device, block_size: int, block_table_width: int,
                 buffer: Optional[HostBuffer] = None):
        self.block_size = block_size
        self.block_table_width = block_table_width
        self.buffer = buffer or HostBuffer(device)

    def build(self, decodes: list[Sequence], prefills: list[tuple[Sequence, int]]) -> StepLayout:
        """Fill the buffer with the step (after :meth:`HostBuffer.reset`, which the caller owns so that sampling
        inputs can share the buffer and its one copy). The logits rows are allocated last, after the tables."""
        bs = self.block_size
        seqs = [(seq, 1) for seq in decodes] + list(prefills)
        num_seqs = len(seqs)
        q_lens = np.array([n for _, n in seqs], dtype=np.int64)
        starts = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(q_lens, out=starts[1:])
        num_tokens = int(starts[-1])
        buf = self.buffer
        f_ids, f_pos = buf.allocate(num_tokens, torch.int32), buf.allocate(num_tokens, torch.int32)
        f_slots = buf.allocate(num_tokens, torch.int64)
        f_lens = buf.allocate(num_seqs, torch.int32)
        f_starts = buf.add(starts, torch.int32)
        f_tables = buf.allocate((num_seqs, self.block_table_width), torch.int32)
        ids, pos, slots, lens, tables = (buf.host(f) for f in (f_ids, f_pos, f_slots, f_lens, f_tables))
        tables.fill(0)
        sampling_rows = []
        for i, (seq, n) in enumerate(seqs):
            cached, a = seq.num_computed_tokens, int(starts[i])
            table = seq.block_table
            if len(table) > self.block_table_width:
                raise ValueError(f"a sequence holds {len(table)} KV blocks, more than block_table_width "
                                 f"({self.block_table_width})")
            tables[i, :len(table)] = table
            if n == 1:   # a decode, or a 1-token chunk: no arrays to build
                ids[a] = seq.token_ids[cached]
                pos[a] = cached
                slots[a] = table[cached // bs] * bs + cached % bs
            else:
                p = np.arange(cached, cached + n)
                ids[a:a + n] = seq.token_ids[cached:cached + n]
                pos[a:a + n] = p
                slots[a:a + n] = tables[i, p // bs].astype(np.int64) * bs + p % bs
            lens[i] = cached + n
            if cached + n == len(seq.token_ids):
                sampling_rows.append(a + n - 1)
        f_logits = buf.add(sampling_rows, torch.int64)
        return StepLayout(f_ids, f_pos, f_slots, f_lens, f_starts, f_tables, f_logits, num_tokens, len(decodes),
                          int(q_lens.max()) if num_seqs else 0)
