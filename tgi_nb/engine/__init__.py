"""tgi_nb's generation engine: continuous batching over a paged KV cache.

Example:
    >>> from tgi_nb.engine import LLMEngine, EngineConfig, SamplingParams
    >>> with LLMEngine(EngineConfig()) as engine:                                   # doctest: +SKIP
    ...     print(engine.generate_sync("Paris is", SamplingParams(max_new_tokens=8)).outputs[0].text)
"""

from .config import DEFAULT_MODEL_ID, EngineConfig
from .embedding_engine import EmbeddingConfig, EmbeddingEngine
from .llm_engine import EngineStats, LLMEngine
from .outputs import CompletionDelta, CompletionResult, GenerationResult, RequestOutput, TokenLogprob, TopLogprob
from .sampling_params import SamplingParams, ValidationError

__all__ = ["DEFAULT_MODEL_ID", "EngineConfig", "EmbeddingConfig", "EmbeddingEngine", "EngineStats", "LLMEngine", "SamplingParams", "ValidationError",
           "RequestOutput", "CompletionDelta", "CompletionResult", "GenerationResult", "TokenLogprob", "TopLogprob"]
