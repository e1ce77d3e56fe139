"""Server settings: what the HTTP layer needs beyond the engine's own configuration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from tgi_nb.models.embedding import DEFAULT_EMBEDDING_MODEL_ID

from .generation_defaults import check_generation_config
from .reasoning import check_parser_name


class SettingsError(ValueError):
    """Settings that cannot work together; the message names the values involved."""


@dataclass(slots=True)
class ServerSettings:
    """How the server listens, limits and labels requests.

    Limits left at None come from the engine once it is loaded (``max_input_tokens``,
    ``max_total_tokens``); when set they must agree with the engine's. ``served_model_name``
    defaults to the engine's model id; clients may send any ``model`` and get this name back.
    ``embedding_model`` is the sentence-transformers model behind /v1/embeddings (a Hub id or a folder;
    None serves no embeddings); it loads on the first embedding request.
    ``files_dir`` holds /v1/files and the Batch API's records (None: a temporary folder removed when the
    server stops), bounded by ``max_file_bytes`` per upload, ``max_files_bytes`` and ``max_files`` in all;
    a batch has at most ``max_batch_requests`` lines, of which ``batch_concurrency`` run at once.
    ``reasoning_parser`` splits thinking from answers (reasoning.py's names; None: the chat template decides,
    ``none``: never). ``generation_config`` is where requests' missing sampling settings come from
    (generation_defaults.py: ``auto``, ``vllm`` or a folder). ``keep_alive_interval`` is how long a stream may stay silent (a long prefill, a full queue)
    before an SSE comment is sent so that proxies and clients do not time out.

    Example:
        >>> ServerSettings(port=8081, api_key="secret").port
        8081
        >>> ServerSettings(max_input_tokens=4096, max_total_tokens=2048)
        Traceback (most recent call last):
        ...
        tgi_nb.server.settings.SettingsError: max_input_tokens (4096) must be < max_total_tokens (2048)
    """

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: Optional[str] = field(default=None, repr=False)   # never in a repr, a log line or a traceback
    # Further keys accepted beside api_key, as SHA-256 digests (auth.key_digest): a local endpoint's owner's
    # Hugging Face token, so that code written for Inference Endpoints runs unchanged; never sent anywhere.
    accepted_key_digests: tuple[str, ...] = field(default=(), repr=False)
    served_model_name: Optional[str] = None
    model_id: Optional[str] = None
    embedding_model: Optional[str] = DEFAULT_EMBEDDING_MODEL_ID
    max_concurrent_requests: int = 128
    max_input_tokens: Optional[int] = None
    max_total_tokens: Optional[int] = None
    max_top_n_tokens: int = 5
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_client_batch_size: int = 4
    payload_limit: int = 2_000_000
    chat_template: Optional[str] = None
    reasoning_parser: Optional[str] = None
    generation_config: str = "auto"
    keep_alive_interval: float = 10.0
    retry_after: int = 1
    cors_allow_origins: list[str] = field(default_factory=list)
    root_path: str = ""
    graceful_shutdown_timeout: float = 5.0
    log_level: str = "info"
    files_dir: Optional[str] = None
    max_file_bytes: int = 200 * 2**20  # OpenAI's limit for a batch input file
    max_files_bytes: int = 2**30
    max_files: int = 1000
    max_batch_requests: int = 50_000  # OpenAI's
    batch_concurrency: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise SettingsError(f"port: must be an integer in [0, 65535], got {self.port!r}")
        for name in ("max_concurrent_requests", "max_best_of", "max_stop_sequences", "max_client_batch_size",
                     "payload_limit", "retry_after", "max_file_bytes", "max_files_bytes", "max_files",
                     "max_batch_requests", "batch_concurrency"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SettingsError(f"{name}: must be an integer >= 1, got {value!r}")
        for name in ("max_input_tokens", "max_total_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise SettingsError(f"{name}: must be an integer >= 1, got {value!r}")
        if not isinstance(self.max_top_n_tokens, int) or not 0 <= self.max_top_n_tokens <= 20:
            raise SettingsError(f"max_top_n_tokens: must be an integer in [0, 20], got {self.max_top_n_tokens!r}")
        from tgi_nb.engine.capacity import limit_conflict   # here: importing this module must not load torch

        conflict = limit_conflict(max_input_tokens=self.max_input_tokens, max_total_tokens=self.max_total_tokens)
        if conflict:
            raise SettingsError(conflict[1])
        if not self.keep_alive_interval > 0:
            raise SettingsError(f"keep_alive_interval: must be > 0 seconds, got {self.keep_alive_interval!r}")
        try:
            check_parser_name(self.reasoning_parser)
            self.generation_config = check_generation_config(self.generation_config)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        if self.api_key == "":
            self.api_key = None
        if self.embedding_model == "":
            self.embedding_model = None
