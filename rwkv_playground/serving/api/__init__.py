"""The OpenAI-compatible HTTP API, served beside the UI on the same port (rwkv_playground.server
mounts the Gradio app beside it):

    GET  /health               503 until a model is loaded, then 200 with its name
    GET  /metrics              Prometheus text format (serving/metrics.py)
    GET  /v1/models            the loaded model
    POST /v1/completions       text completion (streaming: server-sent events ending in [DONE])
    POST /v1/chat/completions  chat in the loaded model's chat format; a conversation that extends
                               an earlier one starts from the state kept after it (completions.py)

    routes.py    the /v1 routes on an APIRouter (runs on the scheduler, streams, races disconnects)
    protocol.py  the wire format: request bodies (strict), refused fields, responses and chunks
    errors.py    one mapper from every failure to an OpenAI-shaped error object and status
    auth.py      the API key, a dependency of every /v1 route

Sampling follows the OpenAI parameters (plus `top_k` and RWKV's `penalty_decay`); a field this
server does not implement is refused with its name, never silently ignored (README,
"OpenAI-compatible API").
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from ..completions import PrefixCache
from ..metrics import CONTENT_TYPE, Metrics
from .errors import ApiError, ClientGone, error_response, install_error_mapper  # noqa: F401
from .protocol import MAX_CHOICES  # noqa: F401
from .routes import (CHAT_DEFAULT_MAX_TOKENS, COMPLETION_DEFAULT_MAX_TOKENS, MAX_STOP_SEQUENCES,  # noqa: F401
                     model_card, model_id, router)

API_KEY_ENV = "RWKV_PLAYGROUND_API_KEY"


@dataclass
class ApiSettings:
    enabled: bool = True
    api_key: str | None = None  # every /v1 route requires "Authorization: Bearer <key>" when set
    max_tokens: int = 8192  # the most tokens one choice may ask for
    max_prompt_tokens: int = 65536
    max_body_bytes: int = 8 << 20
    cache_entries: int = 64  # kept conversation states (also bounded by the memory budget)
    off_reason: str = ""  # why the API is off, said by every /v1 route


def settings_from_env(settings: ApiSettings) -> ApiSettings:
    """The key from RWKV_PLAYGROUND_API_KEY when none was given (app.py, and any embedder)."""
    if settings.api_key is None and os.environ.get(API_KEY_ENV):
        settings.api_key = os.environ[API_KEY_ENV]
    return settings


def route_label(path: str) -> str:
    """The `route` label of the request counter."""
    if path.startswith("/v1/models"):
        return "models"
    return {"/v1/chat/completions": "chat", "/v1/completions": "completions"}.get(path.rstrip("/"), "unknown")


class CountRequests:
    """ASGI middleware counting /v1 requests by route and status (rwkv_api_requests_total); every
    other path (the UI's events, /health, /metrics) passes through untouched."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.api_requests.labels(route_label(scope["path"]), str(status[0])).inc()


def create_api_app(engine, settings: ApiSettings | None = None) -> FastAPI:
    """The FastAPI app with the API routes (rwkv_playground.server mounts the UI beside it)."""
    settings = settings_from_env(settings or ApiSettings())
    app = FastAPI(title="RWKV Playground API", docs_url="/v1/docs", openapi_url="/v1/openapi.json",
                  redoc_url=None)
    metrics = Metrics(engine)
    cache = engine.memory.add(PrefixCache(settings.cache_entries))
    app.state.engine, app.state.metrics, app.state.cache, app.state.api_settings = engine, metrics, cache, settings
    install_error_mapper(app)
    app.add_middleware(CountRequests, metrics=metrics)

    @app.get("/health")
    async def health():
        loaded = engine.current
        if loaded is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", "model": model_id(loaded)}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    if settings.enabled:
        app.include_router(router)
    else:
        @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
        async def api_off(path: str):
            raise ApiError(404, f"The API is off on this server: {settings.off_reason or 'started with --no-api'}.",
                           code="api_disabled")
    return app
