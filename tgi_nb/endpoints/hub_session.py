"""Let huggingface_hub's clients reach servers on this machine when ``HF_HUB_OFFLINE`` is set.

huggingface_hub's offline mode blocks every request of its HTTP session, ``InferenceClient``'s included, even to
127.0.0.1. A server on this machine (an endpoint of this kernel, a ``llama-server`` or TGI started beside it) is
not the Hub: requests to loopback addresses go through; every other request still meets huggingface_hub's own
check, unchanged, so nothing reaches the Hub while offline.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
_lock = threading.Lock()
_installed = False


def _loopback_host(host: str) -> bool:
    host = host.strip("[]")
    return host in _LOOPBACK or host.startswith("127.")


def is_loopback(url: str) -> bool:
    """Whether ``url`` points at this machine's loopback interface.

    Example:
        >>> is_loopback("http://127.0.0.1:8080"), is_loopback("http://[::1]:80"), is_loopback("https://hf.co")
        (True, True, False)
    """
    from urllib.parse import urlsplit

    return _loopback_host(urlsplit(url).hostname or "")


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
