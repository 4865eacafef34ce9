"""The FastAPI application: routers, error handlers, body-size limit, health, lifespan."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from cadenza.server import (
    metrics,
    routes_cluster,
    routes_conversations,
    routes_openai,
    routes_responses,
    routes_sessions,
)
from cadenza.server.errors import error_response, install_error_handlers
from cadenza.server.state import ServerState
from cadenza.server.text_checks import RejectInvalidText, replay_body
from cadenza.server.worker_header import WorkerHeader

log = logging.getLogger("cadenza.server")


class BodySizeLimit:
    """413 for a request body over ``state.max_body_bytes`` (a chunked upload is read up to
    the limit, then replayed). Pure ASGI on purpose: Starlette's ``@app.middleware("http")``
    (BaseHTTPMiddleware) hides the client's disconnect from ``request.is_disconnected()``
    downstream, so a non-streamed request whose client had gone would run to its end."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.state.max_body_bytes
        length = Headers(scope=scope).get("content-length")
        if length is not None:
            if not length.isdigit():
                await error_response(400, "invalid Content-Length header")(scope, receive, send)
            elif int(length) > limit:
                text = f"request body is {int(length)} bytes; the limit is {limit} bytes"
                await error_response(413, text)(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before it finished sending
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                text = f"request body is over the limit of {limit} bytes"
                await error_response(413, text)(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, replay_body(b"".join(chunks), receive), send)


def build_app(state: ServerState, *, extra_routers: tuple[Any, ...] = ()) -> FastAPI:
    """The app around an already running engine. Shutting the app down drains the engine:
    requests in flight finish, queued KV copies land, the store closes cleanly."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        start = getattr(state.engine, "start", None)
        if start is not None:  # a cluster router: its pull loops run on this event loop
            await start()
        yield
        log.info("draining: no new requests; waiting for those in flight")
        close = getattr(state.engine, "aclose", None)
        if close is not None:
            await close()
        else:
            state.engine.shutdown()

    app = FastAPI(
        title="Cadenza",
        version="0.1.0",
        description="Stateful OpenAI-compatible LLM server: KV kept across turns.",
        lifespan=lifespan,
    )
    app.state.cadenza = state
    install_error_handlers(app)

    # Starlette runs the middleware added last first: the size limit bounds what the text
    # check reads.
    app.add_middleware(RejectInvalidText)
    app.add_middleware(BodySizeLimit, state=state)
    app.add_middleware(WorkerHeader)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        engine = state.engine
        return {"status": "ok", "model": state.model_name, "in_flight": engine.num_streams}

    for module in (
        routes_openai,
        routes_sessions,
        routes_responses,
        routes_conversations,
        routes_cluster,
        metrics,
    ):
        app.include_router(module.router)
    for router in extra_routers:
        app.include_router(router)
    return app
