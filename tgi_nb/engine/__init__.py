"""tgi_nb's generation engine: continuous batching over a paged KV cache.

Example:
    >>> from tgi_nb.engine import LLMEngine, EngineConfig, SamplingParams
    >>> with LLMEngine(EngineConfig()) as engine:                                   # doctest: +SKIP
    ...     print(engine.generate_sync("Paris is", SamplingParams(max_new_tokens=8)).outputs[0].text)
"""

import importlib
from typing import TYPE_CHECKING

# Names resolve on first use: the server's settings and the launcher check limits with
# tgi_nb.engine.capacity / .config, which must not pay for torch and transformers.
_LAZY = {
    "DEFAULT_MODEL_ID": ".config",
    "EngineConfig": ".config",
    "EmbeddingConfig": ".embedding_engine",
    "EmbeddingEngine": ".embedding_engine",
    "EngineStats": ".llm_engine",
    "LLMEngine": ".llm_engine",
    "SamplingParams": ".sampling_params",
    "ValidationError": ".sampling_params",
    "RequestOutput": ".outputs",
    "CompletionDelta": ".outputs",
    "CompletionResult": ".outputs",
    "GenerationResult": ".outputs",
    "TokenLogprob": ".outputs",
    "TopLogprob": ".outputs",
}

if TYPE_CHECKING:
    from .config import DEFAULT_MODEL_ID, EngineConfig
    from .embedding_engine import EmbeddingConfig, EmbeddingEngine
    from .llm_engine import EngineStats, LLMEngine
    from .outputs import CompletionDelta, CompletionResult, GenerationResult, RequestOutput, TokenLogprob, TopLogprob
    from .sampling_params import SamplingParams, ValidationError


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = list(_LAZY)
