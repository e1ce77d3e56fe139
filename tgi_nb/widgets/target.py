"""What a widget talks to: an endpoint (tgi_nb's or ``connect()``'s), an ``openai.OpenAI`` client, or a base URL.

Widgets always go through the official ``openai`` client, the one users migrate, so a local endpoint, a remote
TGI / vLLM server and OpenAI itself behave the same. An endpoint's URL is read when a request starts, not when
the widget is built, so a widget made before ``endpoint.wait()`` (or across a pause / resume) keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

DEFAULT_MODEL = "tgi"  # TGI's and tgi_nb's servers accept any model name; OpenAI needs a real one (model=...)


def _v1(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


@dataclass
class Target:
    """A resolved chat target: ``client()`` gives an ``openai.OpenAI`` for the next request.

    Example:
        >>> t = Target.of("http://127.0.0.1:8080")
        >>> t.base_url, t.model, t.label
        ('http://127.0.0.1:8080/v1', 'tgi', '127.0.0.1:8080')
    """

    source: Any
    model: str = DEFAULT_MODEL
    label: str = ""
    api_key: Optional[str] = field(default=None, repr=False)

    @classmethod
    def of(cls, target: Any, model: Optional[str] = None, api_key: Optional[str] = None) -> "Target":
        """Accept an ``InferenceEndpoint``, an ``openai.OpenAI`` client, a base URL or a ``Target``.

        Example:
            >>> Target.of(42)
            Traceback (most recent call last):
            ...
            TypeError: target: expected an InferenceEndpoint, an openai.OpenAI client or a base URL (str), got int
        """
        if isinstance(target, Target):
            return target
        import openai

        if isinstance(target, str):
            if not target.startswith(("http://", "https://")):
                raise ValueError(f"target: a base URL must start with http:// or https://, got {target!r}")
            label = target.split("://", 1)[1].split("/", 1)[0]
            return cls(_v1(target), model or DEFAULT_MODEL, label, api_key)
        if isinstance(target, openai.OpenAI):
            return cls(target, model or DEFAULT_MODEL, str(target.base_url), api_key)
        if hasattr(target, "url") and hasattr(target, "status") and hasattr(target, "name"):
            return cls(target, model or DEFAULT_MODEL, target.name, api_key)
        raise TypeError("target: expected an InferenceEndpoint, an openai.OpenAI client or a base URL (str), "
                        f"got {type(target).__name__}")

    @property
    def endpoint(self) -> Any:
        """The ``InferenceEndpoint`` behind this target, or None."""
        return self.source if hasattr(self.source, "status") and hasattr(self.source, "name") else None

    @property
    def base_url(self) -> Optional[str]:
        """The ``/v1`` URL requests go to (None while an endpoint has no URL yet)."""
        import openai

        if isinstance(self.source, str):
            return self.source
        if isinstance(self.source, openai.OpenAI):
            return str(self.source.base_url).rstrip("/")
        url = self.source.url
        return _v1(url) if url else None

    @property
    def token(self) -> Optional[str]:
        """The bearer token requests carry (the endpoint's own one for an endpoint)."""
        import openai

        if self.api_key is not None:
            return self.api_key
        if isinstance(self.source, openai.OpenAI):
            return self.source.api_key
        return getattr(self.source, "_token", None)

    def client(self, timeout: float = 600.0) -> Any:
        """An ``openai.OpenAI`` client for one request. Widgets retry nothing: an error is shown at once.

        Raises ``RuntimeError`` when an endpoint has no URL yet (it is still starting, paused or deleted).
        """
        import openai

        if isinstance(self.source, openai.OpenAI):
            return self.source
        base_url = self.base_url
        if base_url is None:
            status = getattr(self.source, "status", "unknown")
            raise RuntimeError(f"endpoint {self.label!r} has no URL yet (status: {status}): wait until it runs")
        return openai.OpenAI(base_url=base_url + "/", api_key=self.token or "-", max_retries=0, timeout=timeout)
