"""tgi_nb's HTTP server: OpenAI-compatible routes (/v1) and TGI's routes on one engine.

Example:
    >>> from tgi_nb.engine import EngineConfig, LLMEngine
    >>> from tgi_nb.server import ServerSettings, ServerThread, build_app
    >>> app = build_app(lambda: LLMEngine(EngineConfig()), ServerSettings())   # doctest: +SKIP
    >>> with ServerThread(app, port=8080) as server:                            # doctest: +SKIP
    ...     app.state.holder.wait()
    ...     # OpenAI(base_url=server.url + "/v1", api_key="-") works here
"""

import importlib
from typing import TYPE_CHECKING

# Names resolve on first use: importing tgi_nb.server.launcher or .settings (to check launcher options)
# must not pay for FastAPI, uvicorn and torch.
_LAZY = {
    "build_app": ".app",
    "APIError": ".errors",
    "ServerThread": ".runner",
    "bind_socket": ".runner",
    "EngineHolder": ".context",
    "ServerSettings": ".settings",
    "SettingsError": ".settings",
}

if TYPE_CHECKING:
    from .app import build_app
    from .errors import APIError
    from .runner import ServerThread, bind_socket
    from .context import EngineHolder
    from .settings import ServerSettings, SettingsError


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
