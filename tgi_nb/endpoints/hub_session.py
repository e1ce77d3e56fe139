"""Let huggingface_hub's clients reach servers on this machine when ``HF_HUB_OFFLINE`` is set.

huggingface_hub's offline mode blocks every request of its HTTP session, ``InferenceClient``'s included, even to
127.0.0.1. A server on this machine (an endpoint of this kernel, a ``llama-server`` or TGI started beside it) is
not the Hub: requests to loopback addresses go through; every other request still meets huggingface_hub's own
check, unchanged, so nothing reaches the Hub while offline.
"""

from __future__ import annotations

import ipaddress
import threading
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

# Hosts of Hugging Face's own services (the Hub, Inference Endpoints, Inference Providers, Spaces): the only ones
# a Hugging Face token is sent to unless the caller passes one.
_HF_DOMAINS = ("huggingface.co", "hf.co", "huggingface.cloud", "hf.space")
_lock = threading.Lock()
_installed = False


def _loopback_host(host: str) -> bool:
    """``localhost`` or an address of the loopback range (127.0.0.0/8, ::1); a name is never taken for one
    (``127.example.com`` resolves wherever its owner wants).

    Example:
        >>> [_loopback_host(h) for h in ("localhost", "127.0.0.2", "[::1]", "127.example.com", "127.0.0.1.nip.io")]
        [True, True, True, False, False]
    """
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback(url: str) -> bool:
    """Whether ``url`` points at this machine's loopback interface.

    Example:
        >>> is_loopback("http://127.0.0.1:8080"), is_loopback("http://[::1]:80"), is_loopback("https://hf.co")
        (True, True, False)
    """
    return _loopback_host(urlsplit(url).hostname or "")


def is_hugging_face_url(url: str) -> bool:
    """Whether ``url`` is a service of Hugging Face's (``*.endpoints.huggingface.cloud``, ``huggingface.co``,
    ``hf.co``, ``*.hf.space``), the only hosts a Hugging Face token goes to by default.

    Example:
        >>> is_hugging_face_url("https://xyz.us-east-1.aws.endpoints.huggingface.cloud")
        True
        >>> is_hugging_face_url("http://gpu-box:8000"), is_hugging_face_url("https://huggingface.co.evil.com")
        (False, False)
    """
    host = (urlsplit(url).hostname or "").lower().rstrip(".")
    return any(host == domain or host.endswith("." + domain) for domain in _HF_DOMAINS)


def token_for_url(url: str, token: Any) -> Optional[str]:
    """The bearer token ``connect(url, token)`` sends: ``token`` when given (a string, or True for huggingface_hub's
    own, False for none); when None, ``HF_TOKEN`` or the saved login only for Hugging Face's hosts: a colleague's
    vLLM box is not given the user's Hub credential.

    Example:
        >>> token_for_url("http://gpu-box:8000", None) is None, token_for_url("http://gpu-box:8000", "k")
        (True, 'k')
    """
    from .spec import resolve_token

    if token is None and not is_hugging_face_url(url):
        return None
    return resolve_token(token)


def plain_http_warning(url: str) -> Optional[str]:
    """Why sending a token to ``url`` is unsafe, or None: over ``http://`` to a host that is not this machine,
    anyone on the way can read it.

    Example:
        >>> plain_http_warning("http://127.0.0.1:8080") is None, plain_http_warning("https://gpu-box") is None
        (True, True)
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or _loopback_host(parts.hostname or ""):
        return None
    return (f"the token for {parts.hostname} travels over plain http://: anyone on the network path can read it. "
            f"Use https:// (or an SSH tunnel to 127.0.0.1) for a server on another machine.")


def _is_local(request: Any) -> bool:
    return _loopback_host(request.url.host or "")


def _wrap_sync(hook: Callable) -> Callable:
    from huggingface_hub import constants

    def hook_allowing_loopback(request):
        if constants.is_offline_mode() and _is_local(request):
            return None
        return hook(request)

    return hook_allowing_loopback


def _wrap_async(hook: Callable) -> Callable:
    from huggingface_hub import constants

    async def hook_allowing_loopback(request):
        if constants.is_offline_mode() and _is_local(request):
            return None
        return await hook(request)

    return hook_allowing_loopback


def _patch(client: Any, wrap: Callable) -> Any:
    from huggingface_hub.utils import _http

    originals = (getattr(_http, "hf_request_event_hook", None), getattr(_http, "async_hf_request_event_hook", None))
    hooks = dict(client.event_hooks)
    hooks["request"] = [wrap(h) if h in originals else h for h in hooks.get("request", [])]
    client.event_hooks = hooks
    return client


def allow_loopback_when_offline() -> None:
    """Patch huggingface_hub's shared HTTP session (and the factories of later ones) once; idempotent.

    Example:
        >>> allow_loopback_when_offline()
    """
    global _installed
    with _lock:
        if _installed:
            return
        from huggingface_hub.utils import _http, get_session

        _patch(get_session(), _wrap_sync)  # the live shared session, without closing it under other threads
        factory = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None)
        async_factory = getattr(_http, "_GLOBAL_ASYNC_CLIENT_FACTORY", None)
        if factory is not None:  # sessions created later (after a fork, close_session()...)
            _http._GLOBAL_CLIENT_FACTORY = lambda: _patch(factory(), _wrap_sync)
        if async_factory is not None:
            _http._GLOBAL_ASYNC_CLIENT_FACTORY = lambda: _patch(async_factory(), _wrap_async)
        _installed = True
