"""Decode steps replayed as CUDA graphs, one per batch-size bucket.

A decode step of a small model is hundreds of kernel launches of a few microseconds each: launched one by one
from Python, the GPU waits on the host. Captured once in a CUDA graph, the whole step is one launch. A graph
replays fixed shapes and addresses, so each bucket (1, 2, 4, 8, 16, 32, 48, 64, ... up to ``max_num_seqs``, as
vLLM cuts them) has its own graph over static input buffers: a step of ``n`` sequences copies its inputs into the
first ``n`` rows of the smallest bucket that holds it, fills the rest with padding values (a padded row reads and
writes nothing that matters: the caller picks the values, e.g. context length 0 and a scratch KV slot), replays,
and reads the first ``n`` output rows. Steps larger than the largest bucket run eagerly, and ``enforce_eager``
(vLLM's name; ``--enforce-eager`` / ``ENFORCE_EAGER``) turns graphs off altogether.

On the CPU there is nothing to capture: the same buffers, bucketing and padding are used and the function is
called on the padded buffers instead of a graph being replayed, so CI tests exactly what the GPU replays.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

logger = logging.getLogger("tgi_nb")


def capture_sizes(max_num_seqs: int) -> list[int]:
    """The batch-size buckets graphs are captured for: 1, 2, 4, 8, then every 16 from 16, up to and including
    ``max_num_seqs``.

    Example:
        >>> capture_sizes(64)
        [1, 2, 4, 8, 16, 32, 48, 64]
        >>> capture_sizes(40), capture_sizes(3)
        ([1, 2, 4, 8, 16, 32, 40], [1, 2, 3])
    """
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


@dataclass(frozen=True, slots=True)
class StaticInput:
    """One input of the graphed function: the shape of a row (``()`` for one value per sequence), its dtype, and
    the value padded rows get."""

    row_shape: tuple[int, ...]
    dtype: torch.dtype
    pad: float | int = 0


@dataclass(slots=True)
class GraphStats:
    """What the runner did, for logs and tests."""

    replays: int = 0              # steps served by a captured graph (or, on the CPU, by its stand-in)
    eager: int = 0                # steps run eagerly (beyond the largest bucket, or enforce_eager)
    padded_rows: int = 0          # padding rows computed over all replays
    capture_seconds: float = 0.0
    capture_bytes: int = 0        # GPU memory the graphs' pool holds
    buckets: dict[int, int] = field(default_factory=dict)   # replays per bucket


class DecodeGraphs:
    """Runs ``fn(**inputs) -> Tensor`` (first dimension: one row per sequence) on bucketed static buffers.

    Example:
        >>> graphs = DecodeGraphs(lambda x: x * 2, {"x": StaticInput((), torch.float32, pad=-1)}, max_batch=8,
        ...                       device=torch.device("cpu"))
        >>> graphs.capture()
        >>> graphs.run(x=torch.tensor([1.0, 2.0, 3.0])).tolist(), graphs.bucket_for(3)
        ([2.0, 4.0, 6.0], 4)
    """

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: dict[str, StaticInput], max_batch: int,
                 device: torch.device, enforce_eager: bool = False, sizes: Optional[list[int]] = None):
        self.fn = fn
        self.specs = inputs
        self.device = torch.device(device)
        self.enforce_eager = enforce_eager
        self.sizes = sorted(sizes or capture_sizes(max_batch))
        largest = self.sizes[-1]
        self.static = {name: torch.full((largest, *spec.row_shape), spec.pad, dtype=spec.dtype, device=self.device)
                       for name, spec in inputs.items()}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self.stats = GraphStats()

    @property
    def max_bucket(self) -> int:
        return self.sizes[-1]

    def bucket_for(self, batch: int) -> Optional[int]:
        """The smallest bucket holding ``batch`` rows; None when it runs eagerly."""
        if self.enforce_eager or batch > self.sizes[-1]:
            return None
        return next(s for s in self.sizes if s >= batch)

    def _static_args(self, size: int) -> dict[str, torch.Tensor]:
        return {name: buf[:size] for name, buf in self.static.items()}

    def capture(self) -> None:
        """Capture a graph per bucket, largest first, in one memory pool (once the KV cache exists: the graphs
        bake in its address). Logs the time and GPU memory it took. On the CPU, or with ``enforce_eager``, a
        no-op."""
        if self.enforce_eager or self.device.type != "cuda" or self._graphs:
            return
        started = time.perf_counter()
        torch.cuda.synchronize(self.device)
        free_before = torch.cuda.mem_get_info(self.device)[0]
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        for size in reversed(self.sizes):
            args = self._static_args(size)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):   # warm-up (Triton compiles, cuBLAS picks) outside the graph
                for _ in range(2):
                    self.fn(**args)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[size] = self.fn(**args)
            self._graphs[size] = graph
        torch.cuda.synchronize(self.device)
        self.stats.capture_seconds = time.perf_counter() - started
        self.stats.capture_bytes = max(0, free_before - torch.cuda.mem_get_info(self.device)[0])
        logger.info("captured CUDA graphs for decode batch sizes %s in %.1f s, %.0f MiB",
                    ",".join(map(str, self.sizes)), self.stats.capture_seconds, self.stats.capture_bytes / 2**20)

    def release(self) -> None:
        """Drop the graphs and their memory pool (pause / scale to zero)."""
        self._graphs.clear()
        self._outputs.clear()

    def run(self, **inputs: torch.Tensor) -> torch.Tensor:
        """``fn`` of ``inputs`` (each ``[batch, *row_shape]``), through the bucket's graph when there is one. The
        result may be a view of a static output buffer: read it before the next call."""
        if set(inputs) != set(self.specs):
            raise ValueError(f"inputs must be exactly {sorted(self.specs)}, got {sorted(inputs)}")
        batch = next(iter(inputs.values())).shape[0]
        size = self.bucket_for(batch)
        if size is None:
            self.stats.eager += 1
            return self.fn(**inputs)
        for name, value in inputs.items():
            buf = self.static[name]
            buf[:batch].copy_(value, non_blocking=True)
            if batch < size:
                buf[batch:size].fill_(self.specs[name].pad)
        self.stats.replays += 1
        self.stats.padded_rows += size - batch
        self.stats.buckets[size] = self.stats.buckets.get(size, 0) + 1
        graph = self._graphs.get(size)
        if graph is not None:
            graph.replay()
            return self._outputs[size][:batch]
        # the CPU stand-in (or a bucket not captured): the same padded buffers, called directly
        return self.fn(**self._static_args(size))[:batch]
