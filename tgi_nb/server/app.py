"""The FastAPI application: OpenAI routes, TGI routes, errors, auth and metrics around one engine."""

from __future__ import annotations

from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Callable, Optional, Union

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.middleware.cors import CORSMiddleware
from starlette.staticfiles import StaticFiles

from .auth import APIKeyMiddleware
from .batch_routes import router as batch_router
from .batches import BatchService
from .errors import install_error_handlers
from .limits import PayloadLimitMiddleware
from .openai_routes import router as openai_router
from .responses_routes import router as responses_router
from .context import EngineHolder, ServerContext
from .files import FilesStore
from .settings import ServerSettings
from .tgi_routes import router as tgi_router
from .version import server_version


DOCS_ASSETS = "docs-assets"   # where /docs's swagger-ui scripts are served


def build_app(engine_or_factory: Union[Any, Callable[[], Any]], settings: Optional[ServerSettings] = None,
              embedding_engine: Union[None, Any, Callable[[], Any]] = None) -> FastAPI:
    """An ASGI app serving ``engine_or_factory`` with OpenAI's and TGI's APIs.

    ``engine_or_factory`` is a ready ``LLMEngine`` (the caller keeps ownership: it is never shut
    down here) or a callable returning one, called in a background thread when the app starts; until
    it returns /health answers 503 and generation routes 503 with ``Retry-After``. The app's state
    holds ``app.state.holder`` (:class:`~tgi_nb.server.context.EngineHolder`: ``status``, ``error``,
    ``wait()``, ``unload()``) and ``app.state.ctx``; ``app.state.files`` and ``app.state.batches`` serve
    /v1/files and /v1/batches (under ``settings.files_dir``, else a temporary folder removed at stop).

    /v1/embeddings serves ``embedding_engine`` (an ``EmbeddingEngine``, kept by the caller, or a factory), by
    default one of ``settings.embedding_model``, loaded on the first embedding request.

    Example:
        >>> from tgi_nb.engine import EngineConfig, LLMEngine
        >>> from tgi_nb.server import ServerSettings, ServerThread, build_app
        >>> app = build_app(lambda: LLMEngine(EngineConfig()), ServerSettings(api_key="secret"))  # doctest: +SKIP
        >>> server = ServerThread(app, port=0).start()                                           # doctest: +SKIP
        >>> app.state.holder.wait(120)                                                            # doctest: +SKIP
        True
        >>> server.stop()                                                                          # doctest: +SKIP
    """
    settings = settings or ServerSettings()
    holder = EngineHolder(engine_or_factory)
    if embedding_engine is None and settings.embedding_model:
        embedding_engine = partial(_load_embedding_engine, settings.embedding_model)
    embeddings = EngineHolder(embedding_engine) if embedding_engine is not None else None
    ctx = ServerContext(holder, settings, embeddings)
    files = FilesStore(settings.files_dir, max_file_bytes=settings.max_file_bytes,
                       max_files_bytes=settings.max_files_bytes, max_files=settings.max_files)
    # Batch lines take at most half the concurrent-request slots: interactive requests never meet a 429 for them.
    batches = BatchService(files, max_batch_requests=settings.max_batch_requests, api_key=settings.api_key,
                           concurrency=max(1, min(settings.batch_concurrency, settings.max_concurrent_requests // 2)))

    def drain() -> None:
        batches.stop()  # first: a batch's lines must not be recorded as failed by the drain
        ctx.drain()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx.draining = False  # an app stopped and served again (a restart on the same port) serves again
        holder.start()  # returns at once; the model loads in its own thread
        batches.start()
        try:
            yield
        finally:
            batches.stop()
            files.close()
            holder.shutdown()
            if embeddings is not None:
                embeddings.shutdown()

    app = FastAPI(title="tgi_nb", version=server_version(), lifespan=lifespan, root_path=settings.root_path,
                  docs_url=None,
                  description="OpenAI-compatible (/v1) and Text Generation Inference API on tgi_nb's engine.")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        # Relative URLs: behind a proxy that adds a prefix the server does not know (jupyter-server-proxy's
        # /user/<name>/proxy/<port>/), /docs still finds its openapi.json and scripts. The scripts are the
        # copy of swagger-ui that fastapi-offline ships, not a CDN's: /docs works offline, and no unpinned
        # script from elsewhere runs in the Jupyter origin the page is served from.
        return get_swagger_ui_html(openapi_url="openapi.json", title="tgi_nb - Swagger UI",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png")
    app.mount(f"/{DOCS_ASSETS}", StaticFiles(directory=Path(fastapi_offline.__file__).with_name("static")),
              name=DOCS_ASSETS)
    app.state.ctx = ctx
    app.state.holder = holder
    app.state.drain = drain  # called by DrainingServer when shutdown begins
    app.state.settings = settings
    app.state.files = files
    app.state.batches = batches
    batches.app = app  # what batch lines go through; an endpoint puts its own wrapper here
    install_error_handlers(app)
    app.include_router(openai_router)
    app.include_router(responses_router)
    app.include_router(batch_router)
    app.include_router(tgi_router)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key, accepted_digests=settings.accepted_key_digests)
    app.add_middleware(PayloadLimitMiddleware, limit=settings.payload_limit)
    if settings.cors_allow_origins:
        # Added last so it wraps auth: browsers' preflight requests never carry the key.
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_allow_origins, allow_methods=["*"],
                           allow_headers=["*"])
    return app


def _load_embedding_engine(model_id: str) -> Any:
    from tgi_nb.engine import EmbeddingConfig, EmbeddingEngine

    return EmbeddingEngine(EmbeddingConfig(model_id=model_id))
