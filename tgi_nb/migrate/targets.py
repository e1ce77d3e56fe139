"""What a replay sends requests to: an endpoint (``create_inference_endpoint``'s or ``connect()``'s), an
``openai.OpenAI`` client (OpenAI itself, or any compatible server), or a base URL; each optionally with
settings that change every request (``(endpoint, {"temperature": 0.7})``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional
from urllib.parse import urlsplit

OPENAI_HOST = "api.openai.com"


def _v1(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def _describe(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in overrides.items())


@dataclass
class ReplayTarget:
    """One target: ``source`` (endpoint, client or base URL), ``overrides`` merged into every generation request's
    body (chat, completions, responses; a None value removes the field), ``model`` replacing the recorded ``model`` (None keeps it: tgi_nb, TGI and
    vLLM answer any name, OpenAI needs its own), and the ``label`` the report uses.

    Example:
        >>> t = ReplayTarget.of(("http://127.0.0.1:8080", {"temperature": 0.7}))
        >>> t.label, t.base_url
        ('127.0.0.1:8080 (temperature=0.7)', 'http://127.0.0.1:8080/v1')
        >>> t.body("/v1/chat/completions", {"model": "gpt-4o-mini", "temperature": 0})
        {'model': 'gpt-4o-mini', 'temperature': 0.7}
        >>> t.body("/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi"})["input"]
        'hi'
    """

    source: Any
    overrides: dict[str, Any] = field(default_factory=dict)
    model: Optional[str] = None
    label: str = ""
    api_key: Optional[str] = field(default=None, repr=False)

    @classmethod
    def of(cls, target: Any) -> "ReplayTarget":
        """Accept a :class:`ReplayTarget`, ``(target, overrides)``, an ``InferenceEndpoint``, an
        ``openai.OpenAI`` client or a base URL (``http://...``)."""
        if isinstance(target, ReplayTarget):
            return target
        overrides: dict[str, Any] = {}
        if isinstance(target, tuple) and len(target) == 2 and isinstance(target[1], dict):
            target, overrides = target[0], dict(target[1])
        import openai

        if isinstance(target, str):
            if not target.startswith(("http://", "https://")):
                raise ValueError(f"target: a base URL must start with http:// or https://, got {target!r}")
            label = urlsplit(target).netloc
        elif isinstance(target, openai.OpenAI):
            label = urlsplit(str(target.base_url)).netloc
        elif hasattr(target, "url") and hasattr(target, "name"):
            label = target.name
        else:
            raise TypeError("target: expected an InferenceEndpoint, an openai.OpenAI client, a base URL or "
                            f"(target, overrides), got {type(target).__name__}")
        if overrides:
            label += f" ({_describe(overrides)})"
        return cls(target, overrides, label=label)

    @property
    def base_url(self) -> Optional[str]:
        """The ``/v1`` URL (None while an endpoint has no URL yet)."""
        import openai

        if isinstance(self.source, str):
            return _v1(self.source)
        if isinstance(self.source, openai.OpenAI):
            return str(self.source.base_url).rstrip("/")
        url = self.source.url
        return _v1(url) if url else None

    @property
    def is_openai(self) -> bool:
        """Whether requests go to OpenAI's own API."""
        return urlsplit(self.base_url or "").hostname == OPENAI_HOST

    def client(self, timeout: float = 600.0) -> Any:
        """An ``openai.OpenAI`` for this target (the given one for a client)."""
        import openai

        if isinstance(self.source, openai.OpenAI):
            return self.source
        base_url = self.base_url
        if base_url is None:
            raise RuntimeError(f"target {self.label!r} has no URL yet (status: "
                               f"{getattr(self.source, 'status', 'unknown')}): wait until it runs")
        token = self.api_key or getattr(self.source, "_token", None) or "-"
        return openai.OpenAI(base_url=base_url + "/", api_key=token, timeout=timeout)

    def body(self, endpoint: str, recorded: dict[str, Any]) -> dict[str, Any]:
        """The body to send to ``endpoint`` for a recorded one: the overrides applied (sampling settings mean
        nothing to embeddings: they keep theirs), the model replaced if asked."""
        body = dict(recorded)
        for key, value in self.overrides.items() if endpoint != "/v1/embeddings" else ():
            if value is None:
                body.pop(key, None)
            else:
                body[key] = value
        if self.model is not None:
            body["model"] = self.model
        return body


def resolve_targets(targets: Any) -> list[ReplayTarget]:
    """One target or a list of them, as :class:`ReplayTarget` with distinct labels.

    Example:
        >>> [t.label for t in resolve_targets(["http://a:1", "http://a:1"])]
        ['a:1', 'a:1 #2']
    """
    if not isinstance(targets, list):
        targets = [targets]
    resolved = [ReplayTarget.of(t) for t in targets]
    if not resolved:
        raise ValueError("targets: give at least one target")
    seen: dict[str, int] = {}
    out = []
    for t in resolved:
        seen[t.label] = seen.get(t.label, 0) + 1
        out.append(t if seen[t.label] == 1 else replace(t, label=f"{t.label} #{seen[t.label]}"))
    return out
