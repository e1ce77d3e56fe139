"""From ``create_inference_endpoint``'s arguments to what a local server needs, and to the ``raw`` dict that
``huggingface_hub``'s Inference Endpoints API would return for them.

Nothing here imports the server or torch: ``create_inference_endpoint`` must return at once.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping, Optional

# Accepted `type` values. huggingface_hub names them public / authenticated / private; the cookbook (and older
# huggingface_hub releases) say "protected" for "authenticated". Every type but public requires the token.
ENDPOINT_TYPES = ("public", "authenticated", "protected", "private")
TASKS = ("text-generation", "text2text-generation", "conversational")
BACKENDS = ("thread", "process")
_BACKEND_ALIASES = {"kernel": "thread"}

# Keys of huggingface_hub's TGI image variant ({"tgi": {...}}) that configure the server, and the launcher
# environment variable each one stands for.
_TGI_IMAGE_KEYS = {
    "maxInputLength": "MAX_INPUT_LENGTH",
    "maxInputTokens": "MAX_INPUT_TOKENS",
    "maxTotalTokens": "MAX_TOTAL_TOKENS",
    "maxBatchPrefillTokens": "MAX_BATCH_PREFILL_TOKENS",
    "maxBatchTotalTokens": "MAX_BATCH_TOTAL_TOKENS",
    "maxConcurrentRequests": "MAX_CONCURRENT_REQUESTS",
}

# Keys of a flat image dict (the cookbook's form), as opposed to a variant name wrapping one.
_FLAT_IMAGE_KEYS = frozenset({"url", "env", "health_route", "healthRoute", "port", "credentials"})

# MODEL_ID set to this (as in the cookbook) means "the `repository` argument": on Hugging Face the repository is
# mounted there inside the container.
REPOSITORY_MOUNT = "/repository"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_local_token() -> str:
    """A random bearer token for a protected local endpoint created without one (never the user's Hugging Face
    token: whoever is given a local endpoint's password must not hold a Hub credential).

    Example:
        >>> new_local_token().startswith("tgi-nb-") and new_local_token() != new_local_token()
        True
    """
    return "tgi-nb-" + secrets.token_urlsafe(24)


def resolve_token(token: Any) -> Optional[str]:
    """A token as huggingface_hub resolves it, for Hugging Face's own endpoints: a string is used as is,
    ``False`` means none, ``None``/``True`` mean ``HF_TOKEN`` or the saved login.

    Example:
        >>> resolve_token("hf_abc"), resolve_token(False)
        ('hf_abc', None)
    """
    if isinstance(token, str):
        return token or None
    if token is False:
        return None
    if token not in (None, True):
        raise TypeError(f"token: expected a string, True, False or None, got {type(token).__name__}")
    from huggingface_hub import get_token  # HF_TOKEN first, then the token saved by `hf auth login`

    return get_token()


def image_env(custom_image: Optional[Mapping[str, Any]]) -> tuple[dict[str, str], Optional[str]]:
    """The launcher environment a ``custom_image`` carries, and its health route (None: not given).

    Accepts the flat dict of the cookbook (``{"url", "health_route", "env"}``) and huggingface_hub's variant
    form (``{"tgi": {"url", "healthRoute", "maxTotalTokens", ..., "env"}}``).

    Example:
        >>> image_env({"health_route": "/health", "env": {"MAX_TOTAL_TOKENS": "2048"}})
        ({'MAX_TOTAL_TOKENS': '2048'}, '/health')
        >>> image_env({"env": {"MAX_TOTAL_TOKENS": "2048"}})
        ({'MAX_TOTAL_TOKENS': '2048'}, None)
        >>> image_env({"tgi": {"url": "ghcr.io/...", "maxInputLength": 1024}})
        ({'MAX_INPUT_LENGTH': '1024'}, None)
    """
    if not custom_image:
        return {}, None
    if not isinstance(custom_image, Mapping):
        raise TypeError(f"custom_image: expected a dict, got {type(custom_image).__name__}")
    body: Mapping[str, Any] = custom_image
    if len(custom_image) == 1 and not set(custom_image) & _FLAT_IMAGE_KEYS:  # {"tgi": {...}}, {"custom": {...}}
        (inner,) = custom_image.values()
        if isinstance(inner, Mapping):
            body = inner
    env = {key: str(value) for key, value in (body.get("env") or {}).items()}
    for key, var in _TGI_IMAGE_KEYS.items():
        if body.get(key) is not None:
            env.setdefault(var, str(body[key]))
    health = body.get("health_route") or body.get("healthRoute")
    return env, health


def _str_env(name: str, values: Optional[Mapping[str, Any]]) -> dict[str, str]:
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise TypeError(f"{name}: expected a dict of strings, got {type(values).__name__}")
    return {str(k): str(v) for k, v in values.items()}


@dataclass(frozen=True)
class LaunchSpec:
    """Everything that decides how a local server runs. Two specs that compare equal serve the same thing, so
    re-running a creating cell with an equal spec keeps the running server; any difference restarts it.

    - ``model_id``: what the engine loads (MODEL_ID, where "/repository" means ``repository``).
    - ``env``: the launcher's environment variables (TGI's names), from ``custom_image`` then ``env``.
    - ``args``: launcher flags (``container_args``); a flag wins over its variable, as with TGI.
    - ``api_key``: the bearer token every route but /health requires; None for public endpoints (not in the repr).
    - ``accepted_key_digests``: SHA-256 digests of further keys accepted beside ``api_key`` (the owner's Hugging
      Face token, for an endpoint given no token that listens on loopback only).
    - ``scale_to_zero_after``: seconds without requests before the model is freed (None: never).
    """

    model_id: str
    revision: Optional[str]
    env: tuple[tuple[str, str], ...]
    args: tuple[str, ...]
    api_key: Optional[str] = field(repr=False)
    accelerator: Optional[str]
    scale_to_zero_after: Optional[float]
    backend: str
    host: str
    port: Optional[int]
    secrets: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    accepted_key_digests: tuple[str, ...] = field(default=(), repr=False)

    @property
    def env_dict(self) -> dict[str, str]:
        return dict(self.env)

    @property
    def secrets_dict(self) -> dict[str, str]:
        return dict(self.secrets)


@dataclass
class EndpointRequest:
    """The validated arguments of one ``create_inference_endpoint`` call: the launch spec and what is only
    recorded (vendor, region, instance, scaling, tags...), from which ``raw`` is built."""

    name: str
    repository: str
    type: str
    token: Optional[str] = field(repr=False)
    launch: LaunchSpec
    framework: Optional[str]
    task: Optional[str]
    health_route: str
    recorded: dict[str, Any]
    token_generated: bool = False   # the token is new_local_token()'s: none was given for a protected endpoint

    def raw(self, *, state: str, url: Optional[str], message: Optional[str], created_at: datetime,
            updated_at: datetime, extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """The dict huggingface_hub's API returns for an endpoint, as this local one would be described."""
        r = self.recorded
        launch = self.launch
        return {
            "name": self.name,
            "type": self.type,
            "accountId": r.get("account_id"),
            "provider": {"vendor": r.get("vendor"), "region": r.get("region")},
            "compute": {
                "accelerator": launch.accelerator,
                "instanceType": r.get("instance_type"),
                "instanceSize": r.get("instance_size"),
                "scaling": {"minReplica": r.get("min_replica"), "maxReplica": r.get("max_replica"),
                            "scaleToZeroTimeout": r.get("scale_to_zero_timeout"),
                            "metric": r.get("scaling_metric"), "threshold": r.get("scaling_threshold")},
            },
            "model": {
                "repository": self.repository,
                "revision": launch.revision or "main",
                "task": self.task or "text-generation",
                "framework": self.framework or "pytorch",
                "image": r.get("custom_image") or {"tgi_nb": {"backend": launch.backend}},
                "env": launch.env_dict,
                "secrets": {key: "********" for key in launch.secrets_dict},  # never echoed, as on the Hub
                "command": r.get("container_command"),
                "args": list(launch.args),
            },
            "route": {"domain": r.get("domain"), "path": r.get("path")},
            "cacheHttpResponses": r.get("cache_http_responses"),
            "tags": list(r.get("tags") or []),
            "healthRoute": self.health_route,
            "status": {
                "state": state,
                "url": url,
                "message": message,
                "createdAt": created_at.isoformat(),
                "updatedAt": updated_at.isoformat(),
                "readyReplica": 1 if state == "running" else 0,
                "targetReplica": 0 if state in ("paused", "scaledToZero") else 1,
            },
            "tgi_nb": dict(extra or {}),
        }


def build_request(name: str, *, repository: str, framework: Optional[str] = None, accelerator: Optional[str] = None,
                  instance_size: Optional[str] = None, instance_type: Optional[str] = None,
                  region: Optional[str] = None, vendor: Optional[str] = None, account_id: Optional[str] = None,
                  private_link_account_id: Optional[str] = None, private_link_region: Optional[str] = None,
                  min_replica: int = 1, max_replica: int = 1, scaling_metric: Any = None,
                  scaling_threshold: Optional[float] = None, scale_to_zero_timeout: Optional[float] = None,
                  revision: Optional[str] = None, task: Optional[str] = None,
                  custom_image: Optional[Mapping[str, Any]] = None,
                  container_registry_username: Optional[str] = None,
                  container_registry_password: Optional[str] = None,
                  container_command: Optional[list[str]] = None, container_args: Optional[list[str]] = None,
                  env: Optional[Mapping[str, Any]] = None, secrets: Optional[Mapping[str, Any]] = None,
                  type: Any = "authenticated", domain: Optional[str] = None, path: Optional[str] = None,
                  cache_http_responses: Optional[bool] = None, tags: Optional[list[str]] = None,
                  namespace: Optional[str] = None, token: Any = None, backend: str = "thread",
                  host: str = "127.0.0.1", port: Optional[int] = None,
                  embedding_model: Optional[str] = None, generated_token: Optional[str] = None) -> EndpointRequest:
    """Validate ``create_inference_endpoint``'s arguments; errors name the argument and the allowed values.

    A protected endpoint given no ``token`` gets ``generated_token`` (the one made for its name before) or a new
    random one; on loopback it also accepts the Hugging Face token huggingface_hub would send (``HF_TOKEN`` or the
    saved login), so that the cookbook's ``OpenAI(..., api_key=HF_API_KEY)`` runs unchanged, while the password
    shown and handed around (``endpoint.token``) is never a Hub credential.

    Example:
        >>> req = build_request("demo", repository="HuggingFaceTB/SmolLM2-135M-Instruct", type="public",
        ...                     custom_image={"env": {"MODEL_ID": "/repository", "MAX_TOTAL_TOKENS": "2048"}})
        >>> req.launch.model_id, req.launch.env_dict["MAX_TOTAL_TOKENS"], req.launch.api_key
        ('HuggingFaceTB/SmolLM2-135M-Instruct', '2048', None)
    """
    if not isinstance(name, str) or not name.strip() or "/" in name:
        raise ValueError(f"name: must be a non-empty string without '/', got {name!r}")
    if not isinstance(repository, str) or not repository:
        raise ValueError(f"repository: must be a model id, a local folder or a .gguf file, got {repository!r}")
    type_ = getattr(type, "value", type)  # huggingface_hub's InferenceEndpointType enum, or a string
    if type_ not in ENDPOINT_TYPES:
        raise ValueError(f"type: must be one of {', '.join(ENDPOINT_TYPES)}, got {type_!r}")
    if task is not None and task not in TASKS:
        raise ValueError(f"task: tgi_nb serves text generation; must be one of {', '.join(TASKS)} or None, "
                         f"got {task!r}")
    backend = _BACKEND_ALIASES.get(backend, backend)
    if backend not in BACKENDS:
        raise ValueError(f"backend: must be one of {', '.join(BACKENDS)}, got {backend!r} "
                         f"(tgi_nb.connect(url) wraps a remote endpoint)")
    if port is not None and (not isinstance(port, int) or not 0 <= port <= 65535):
        raise ValueError(f"port: must be an integer in [0, 65535] or None, got {port!r}")
    if container_args is not None and (isinstance(container_args, str)
                                       or not all(isinstance(a, str) for a in container_args)):
        raise TypeError("container_args: expected a list of strings, e.g. ['--max-total-tokens', '2048']")
    for arg_name, value in (("min_replica", min_replica), ("max_replica", max_replica)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{arg_name}: must be an integer >= 0, got {value!r}")
    if scale_to_zero_timeout is not None and (not isinstance(scale_to_zero_timeout, (int, float))
                                              or scale_to_zero_timeout <= 0):
        raise ValueError(f"scale_to_zero_timeout: must be a number of minutes > 0 or None, "
                         f"got {scale_to_zero_timeout!r}")
    if container_registry_password is not None and container_registry_username is None:
        raise ValueError("container_registry_password requires container_registry_username")

    launcher_env, image_health = image_env(custom_image)
    launcher_env.update(_str_env("env", env))
    if embedding_model is not None:
        if not isinstance(embedding_model, str):
            raise TypeError(f"embedding_model: expected a Hub id, a local folder or 'none', got {embedding_model!r}")
        launcher_env["EMBEDDING_MODEL"] = embedding_model
    secret_env = _str_env("secrets", secrets)
    model_id = launcher_env.pop("MODEL_ID", None)
    if model_id in (None, "", REPOSITORY_MOUNT):
        model_id = repository
    revision = revision or launcher_env.pop("REVISION", None) or None
    launcher_env.pop("REVISION", None)

    if token is not None and not isinstance(token, (str, bool)):
        raise TypeError(f"token: expected a string, True, False or None, got {type(token).__name__}")
    # Locally the token is only the endpoint's password: None makes a random one rather than taking HF_TOKEN;
    # True asks for huggingface_hub's token explicitly.
    token_generated = token is None and type_ != "public"
    if token_generated:
        resolved_token = generated_token or new_local_token()
    else:
        resolved_token = None if token is None else resolve_token(token)
    api_key = None
    accepted_key_digests: tuple[str, ...] = ()
    if type_ != "public":
        if not resolved_token:
            raise ValueError(
                f"type={type_!r} endpoints require a token: pass token='...' (any string: it is the password "
                f"clients send as 'Authorization: Bearer ...'), leave it out for a random one, or use type='public'")
        api_key = resolved_token
        hub_token = resolve_token(None) if token_generated and _is_loopback_host(host) else None
        if hub_token:  # only its digest is kept (auth.key_digest): the server never holds the Hub credential
            accepted_key_digests = (hashlib.sha256(hub_token.encode()).hexdigest(),)
    # HF's scale-to-zero: with min_replica=0 the model is freed after scale_to_zero_timeout idle minutes.
    idle_after = float(scale_to_zero_timeout) * 60 if (scale_to_zero_timeout and min_replica == 0) else None

    launch = LaunchSpec(model_id=model_id, revision=revision, env=tuple(sorted(launcher_env.items())),
                        args=tuple(container_args or ()), api_key=api_key,
                        accelerator=accelerator, scale_to_zero_after=idle_after, backend=backend, host=host,
                        port=port, secrets=tuple(sorted(secret_env.items())),
                        accepted_key_digests=accepted_key_digests)
    recorded = dict(vendor=vendor, region=region, instance_type=instance_type, instance_size=instance_size,
                    account_id=account_id, private_link_account_id=private_link_account_id,
                    private_link_region=private_link_region, min_replica=min_replica, max_replica=max_replica,
                    scaling_metric=getattr(scaling_metric, "value", scaling_metric),
                    scaling_threshold=scaling_threshold, scale_to_zero_timeout=scale_to_zero_timeout,
                    custom_image=_redacted_image(custom_image), container_command=container_command,
                    container_registry_username=container_registry_username, domain=domain, path=path,
                    cache_http_responses=cache_http_responses, tags=tags, namespace=namespace)
    return EndpointRequest(name=name, repository=repository, type=type_, token=resolved_token, launch=launch,
                           framework=framework, task=task, health_route=image_health or "/health",
                           recorded=recorded, token_generated=token_generated)


def _is_loopback_host(host: str) -> bool:
    from .hub_session import is_loopback

    return is_loopback(f"http://{host}:1" if ":" not in host else f"http://[{host}]:1")


def _redacted_image(custom_image: Optional[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
    if not custom_image:
        return None
    out = dict(custom_image)
    out.pop("credentials", None)
    return out


def host_env_for_child(launch: LaunchSpec) -> dict[str, str]:
    """The environment of a child server process: the kernel's own, plus the endpoint's env and secrets (as a
    container would see them)."""
    env = dict(os.environ)
    env.update(launch.env_dict)
    env.update(launch.secrets_dict)
    return env
