"""The FastAPI application: routers, error handlers, body-size limit, health, lifespan."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response

from cadenza.server import routes_openai, routes_sessions
from cadenza.server.errors import error_response, install_error_handlers
from cadenza.server.state import ServerState, get_state

log = logging.getLogger("cadenza.server")


def build_app(state: ServerState, *, extra_routers: tuple[Any, ...] = ()) -> FastAPI:
    """The app around an already running engine. Shutting the app down drains the engine:
    requests in flight finish, queued KV copies land, the store closes cleanly."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        log.info("draining: no new requests; waiting for those in flight")
        state.engine.shutdown()

    app = FastAPI(
        title="Cadenza",
        version="0.1.0",
        description="Stateful OpenAI-compatible LLM server: KV kept across turns.",
        lifespan=lifespan,
    )
    app.state.cadenza = state
    install_error_handlers(app)

    @app.middleware("http")
    async def limit_body(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        limit = get_state(request).max_body_bytes
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return error_response(400, "invalid Content-Length header")
            if int(length) > limit:
                return error_response(
                    413, f"request body is {int(length)} bytes; the limit is {limit} bytes"
                )
        elif request.method in ("POST", "PUT", "PATCH"):
            body = await request.body()  # chunked upload: read it, then check
            if len(body) > limit:
                return error_response(413, f"request body is over the limit of {limit} bytes")
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        engine = state.engine
        return {"status": "ok", "model": state.model_name, "in_flight": engine.num_streams}

    app.include_router(routes_openai.router)
    app.include_router(routes_sessions.router)
    for router in extra_routers:
        app.include_router(router)
    return app
