"""tgi_nb's HTTP server: OpenAI-compatible routes (/v1) and TGI's routes on one engine.

Example:
    >>> from tgi_nb.engine import EngineConfig, LLMEngine
    >>> from tgi_nb.server import ServerSettings, ServerThread, build_app
    >>> app = build_app(lambda: LLMEngine(EngineConfig()), ServerSettings())   # doctest: +SKIP
    >>> with ServerThread(app, port=8080) as server:                            # doctest: +SKIP
    ...     app.state.holder.wait()
    ...     # OpenAI(base_url=server.url + "/v1", api_key="-") works here
"""

from .app import build_app
from .errors import APIError
from .runner import ServerThread, bind_socket
from .serving import EngineHolder
from .settings import ServerSettings, SettingsError

__all__ = ["APIError", "EngineHolder", "ServerSettings", "ServerThread", "SettingsError", "bind_socket", "build_app"]
