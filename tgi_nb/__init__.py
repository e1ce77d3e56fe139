"""tgi_nb: run open LLMs behind an OpenAI-compatible, TGI-style API from a Jupyter notebook.

Importing the package is cheap: the engine (and torch) load on first use of a name that needs them.

Example:
    >>> import tgi_nb
    >>> tgi_nb.__version__
    '0.1.0'
    >>> engine = tgi_nb.LLMEngine(tgi_nb.EngineConfig())                 # doctest: +SKIP
    >>> next(iter(engine.stream("Hello", tgi_nb.SamplingParams(max_new_tokens=4))))  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> module that defines it; resolved on first access (PEP 562) so that
# `import tgi_nb` does not import torch or the server.
_LAZY = {
    "LLMEngine": "tgi_nb.engine",
    "EngineConfig": "tgi_nb.engine",
    "SamplingParams": "tgi_nb.engine",
    "resolve_model": "tgi_nb.models",
    "ResolvedModel": "tgi_nb.models",
    "ModelNotFoundError": "tgi_nb.models",
    "create_inference_endpoint": "tgi_nb.endpoints",
    "get_inference_endpoint": "tgi_nb.endpoints",
    "list_inference_endpoints": "tgi_nb.endpoints",
    "connect": "tgi_nb.endpoints",
    "InferenceEndpoint": "tgi_nb.endpoints",
    "workbench": "tgi_nb.widgets",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # for editors and type checkers only
    from .endpoints import (InferenceEndpoint, connect, create_inference_endpoint, get_inference_endpoint,
                            list_inference_endpoints)
    from .engine import EngineConfig, LLMEngine, SamplingParams
    from .models import ModelNotFoundError, ResolvedModel, resolve_model
    from .widgets import workbench


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tgi_nb' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
