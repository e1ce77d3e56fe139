"""The engine as the server sees it: :class:`GenerationEngine`, which :class:`~tgi_nb.engine.LLMEngine` meets.

The server (one layer up) types its routes with this protocol instead of the concrete class, so that a
test double or another engine with the same methods serves the same routes, and so that what the server
relies on is written down in one place.

Example:
    >>> from tgi_nb.engine.interface import GenerationEngine
    >>> from tgi_nb.engine import LLMEngine
    >>> missing = [name for name in ("add_request", "abort", "tokenize", "stats", "shutdown")
    ...            if not hasattr(LLMEngine, name)]
    >>> missing
    []
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, runtime_checkable

from .config import EngineConfig
from .sampling_params import SamplingParams


@runtime_checkable
class GenerationEngine(Protocol):
    """Tokenizer, limits and the request API of a text-generation engine."""

    model_id: str
    tokenizer: Any               # a transformers tokenizer
    config: EngineConfig         # with the limits the capacity planner settled on
    max_input_tokens: int
    max_total_tokens: int
    vocab_size: int
    eos_token_ids: set[int]

    def tokenize(self, prompt: str | list[int], add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``prompt`` (ids pass through)."""
        ...

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: Optional[str] = None,
                    on_output: Optional[Callable[..., None]] = None, **kwargs: Any) -> str:
        """Queue a request; outputs go to ``on_output`` from the engine's thread. Returns the request id."""
        ...

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks."""
        ...

    def stats(self) -> Any:
        """An ``EngineStats`` snapshot (running, waiting, KV blocks, ...)."""
        ...

    def shutdown(self) -> None:
        """Stop the engine's thread and free its memory."""
        ...
