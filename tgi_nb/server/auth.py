"""Bearer-token authentication for every route but /health, as TGI's ``--api-key`` does."""

from __future__ import annotations

import hashlib
import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import Unauthorized

# /health stays open so that load balancers, `endpoint.wait()` and Docker health checks need no key.
PUBLIC_PATHS = frozenset({"/health"})


def app_path(scope: Scope) -> str:
    """The request's path inside the app: without the ``root_path`` a proxy mounted it under.

    Example:
        >>> app_path({"path": "/user/a/proxy/8080/health", "root_path": "/user/a/proxy/8080"})
        '/health'
    """
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path


def key_digest(key: str) -> str:
    """The SHA-256 (hex) of a bearer key: how a server holds a key it accepts without keeping the key itself.

    Example:
        >>> key_digest("s3cret")[:12]
        '1ec1c26b50d5'
    """
    return hashlib.sha256(key.encode()).hexdigest()


def check_bearer(authorization: str | None, api_key: str, accepted_digests: tuple[str, ...] = ()) -> None:
    """Raise :class:`Unauthorized` unless ``authorization`` is ``Bearer <api_key>`` or ``Bearer <k>`` for a key
    ``k`` whose :func:`key_digest` is in ``accepted_digests``.

    The comparisons take the same time whatever the key's prefix (``hmac.compare_digest``).

    Example:
        >>> check_bearer("Bearer s3cret", "s3cret")
        >>> check_bearer("Bearer other", "s3cret", (key_digest("other"),))
        >>> check_bearer("Bearer nope", "s3cret")
        Traceback (most recent call last):
        ...
        tgi_nb.server.errors.Unauthorized: Incorrect API key provided.
    """
    if not authorization:
        raise Unauthorized("You didn't provide an API key. You need to provide your API key in an "
                           "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("The Authorization header must be 'Bearer YOUR_KEY'.")
    token = token.strip()
    if hmac.compare_digest(token.encode(), api_key.encode()):
        return
    digest = key_digest(token)
    if not any(hmac.compare_digest(digest, accepted) for accepted in accepted_digests):
        raise Unauthorized("Incorrect API key provided.")


class APIKeyMiddleware:
    """Pure ASGI middleware (not BaseHTTPMiddleware, which would buffer streams and hide disconnects)."""

    def __init__(self, app: ASGIApp, api_key: str, accepted_digests: tuple[str, ...] = ()):
        self.app = app
        self.api_key = api_key
        self.accepted_digests = accepted_digests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS":  # CORS preflights carry no credentials
            await self.app(scope, receive, send)
            return
        path = app_path(scope)
        if path in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        authorization = headers.get(b"authorization", b"").decode("latin-1") or None
        try:
            check_bearer(authorization, self.api_key, self.accepted_digests)
        except Unauthorized as err:
            await err.response(path)(scope, receive, send)
            return
        await self.app(scope, receive, send)
