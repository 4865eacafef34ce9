"""``X-Cadenza-Worker``: every response says which worker ran it.

The middleware puts a fresh holder in a context variable before the route runs; whatever
places the request (the cluster router, or the single in-process engine) writes the worker's
id into it, and the header is added when the response starts. Streaming responses start after
the first output, so the worker is known by then; a request that never reached a worker
(a 4xx before placement) gets no header.
"""

from __future__ import annotations

import contextvars

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-cadenza-worker"
WORKER_OF_REQUEST: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "cadenza_worker_of_request", default=None
)


def set_worker(worker_id: str) -> None:
    """Record the worker running the current HTTP request (no-op outside one)."""
    holder = WORKER_OF_REQUEST.get()
    if holder is not None:
        holder["worker"] = worker_id


class WorkerHeader:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        holder: dict[str, str] = {}
        token = WORKER_OF_REQUEST.set(holder)

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start" and holder.get("worker"):
                headers = list(message.get("headers", []))
                headers.append((HEADER, holder["worker"].encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_header)
        finally:
            WORKER_OF_REQUEST.reset(token)
