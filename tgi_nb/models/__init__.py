"""Model loading: where weights come from (a folder, the Hub, a GGUF file, the bundled SmolLM2).

Example:
    >>> from tgi_nb.models import resolve_model
    >>> r = resolve_model()   # HuggingFaceTB/SmolLM2-135M-Instruct, from the Hub or the bundled copy
    >>> sorted(p.name for p in r.path.glob("config.json"))
    ['config.json']
"""

from .loader import (
    DEFAULT_MODEL_ID,
    ModelNotFoundError,
    ResolvedModel,
    bundled_gguf_path,
    cache_root,
    convert_gguf,
    resolve_model,
    source_gguf,
)
from .embedding import DEFAULT_EMBEDDING_MODEL_ID, bundled_embedding_path, no_loading_bars, resolve_embedding_model

__all__ = [
    "DEFAULT_EMBEDDING_MODEL_ID",
    "bundled_embedding_path",
    "no_loading_bars",
    "resolve_embedding_model",
    "DEFAULT_MODEL_ID",
    "ModelNotFoundError",
    "ResolvedModel",
    "bundled_gguf_path",
    "cache_root",
    "convert_gguf",
    "resolve_model",
    "source_gguf",
]
