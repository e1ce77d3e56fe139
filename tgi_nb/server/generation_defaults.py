"""The model's recommended sampling settings, as vLLM's ``--generation-config``: the sampling fields of the
model's ``generation_config.json`` apply to a request that leaves them out, on the OpenAI routes (chat,
completions, responses); ``/info`` reports them, so clients and widgets can start from them.

- ``auto`` (the default): the model folder's own ``generation_config.json``.
- ``vllm``: none; OpenAI's neutral defaults (temperature 1, top_p 1).
- a folder: the ``generation_config.json`` in that folder.

TGI's own ``/generate`` keeps TGI's meaning (greedy unless sampling is asked for). Only sampling fields are
read; ``max_new_tokens`` is not (a request without ``max_tokens`` runs until the context is full, as before).

Example:
    >>> import json, pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.2, "top_p": 0.9,
    ...                                                                 "eos_token_id": 2}))
    >>> sampling_defaults("auto", folder), sampling_defaults("vllm", folder)
    ({'temperature': 0.2, 'top_p': 0.9}, {})
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Union

logger = logging.getLogger("tgi_nb.server")

MODES = ("auto", "vllm")
# generation_config.json's sampling fields, which the OpenAI routes name alike.
FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def check_generation_config(value: Optional[str]) -> str:
    """``value`` if it is ``auto``, ``vllm`` or a folder that exists (None: ``auto``); else a ValueError naming
    the allowed values.

    Example:
        >>> check_generation_config(None), check_generation_config("vllm")
        ('auto', 'vllm')
        >>> check_generation_config("/no/such/folder")
        Traceback (most recent call last):
        ...
        ValueError: generation_config: must be 'auto', 'vllm' or a folder with a generation_config.json, got '/no/such/folder'
    """
    if value is None or value in MODES:
        return value or "auto"
    if Path(value).expanduser().is_dir():
        return value
    raise ValueError(f"generation_config: must be 'auto', 'vllm' or a folder with a generation_config.json, "
                     f"got {value!r}")


def sampling_defaults(mode: str, model_dir: Optional[Union[str, Path]]) -> dict[str, float]:
    """The sampling fields that ``mode`` takes from a ``generation_config.json`` (``{}`` when there is none)."""
    if mode == "vllm":
        return {}
    folder = Path(model_dir) if mode == "auto" and model_dir is not None else (
        Path(mode).expanduser() if mode != "auto" else None)
    path = folder / "generation_config.json" if folder is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        logger.warning("generation_config: %s is not readable JSON (%s); no sampling defaults", path, exc)
        return {}
    return {name: data[name] for name in FIELDS
            if isinstance(data.get(name), (int, float)) and not isinstance(data.get(name), bool)}
