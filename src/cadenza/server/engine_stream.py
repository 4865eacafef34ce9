"""Running one engine request for an HTTP handler: submit, first output, the rest, and the
session bookkeeping around it.

* ``start_stream`` submits the request and waits for its first output before the handler
  answers, so a rejection (bad input, full queue) becomes an HTTP error instead of a broken
  stream. While it waits — in the queue, or through a long prefill — it watches the client:
  one that disconnects aborts the request at once, so it costs nothing more and leaves the
  queue.
* A session turn's outputs pass through the session layer: the final one appends the turn to
  the durable history *before* it reaches the client; a stream that ends any other way
  (client gone, engine failure) marks the turn aborted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request

from cadenza.engine_api import EngineRequest
from cadenza.outputs import RequestOutput
from cadenza.server.errors import APIError
from cadenza.server.state import ServerState

# How often a handler waiting for output checks whether its client is still there.
DISCONNECT_POLL_S = 0.25


async def _outputs(state: ServerState, request: EngineRequest) -> AsyncIterator[RequestOutput]:
    sessions = state.sessions if request.session_id is not None else None
    stream = state.engine.generate(request)
    try:
        async for output in stream:
            if sessions is not None and output.finished:
                sessions.observe(output)
            yield output
    finally:
        await stream.aclose()
        if sessions is not None:
            sessions.abort(request.request_id)  # a no-op once the turn was recorded


async def start_stream(
    state: ServerState, request: EngineRequest, http: Request | None = None
) -> tuple[RequestOutput | None, AsyncIterator[RequestOutput]]:
    """Submit ``request`` and wait for its first output (aborting it if the client leaves
    first); returns that output and the stream of the rest."""
    stream = _outputs(state, request)
    first_task = asyncio.ensure_future(stream.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({first_task}, timeout=DISCONNECT_POLL_S)
            if done:
                break
            if http is not None and await http.is_disconnected():
                first_task.cancel()
                await asyncio.gather(first_task, return_exceptions=True)
                await stream.aclose()
                raise APIError(499, "client disconnected")
        first: RequestOutput | None = first_task.result()
    except StopAsyncIteration:
        first = None
    except BaseException:
        if not first_task.done():
            first_task.cancel()
        await stream.aclose()
        raise
    return first, stream


async def collect(
    http: Request, first: RequestOutput | None, stream: AsyncIterator[RequestOutput]
) -> RequestOutput:
    """The final output; aborts the request if the client disconnects while waiting."""
    final = first
    if final is not None and final.finished:
        await stream.aclose()  # type: ignore[attr-defined]
        return final

    async def drain() -> RequestOutput | None:
        last = final
        async for output in stream:
            last = output
        return last

    task = asyncio.ensure_future(drain())
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if not done and await http.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await stream.aclose()  # type: ignore[attr-defined]
            raise APIError(499, "client disconnected")
    result = task.result()
    if result is None:
        raise RuntimeError("the request ended without output")
    return result


async def chain(
    first: RequestOutput | None, stream: AsyncIterator[RequestOutput]
) -> AsyncIterator[RequestOutput]:
    """The first output, then the rest of the stream (closed however the caller stops)."""
    try:
        if first is not None:
            yield first
            if first.finished:
                return
        async for output in stream:
            yield output
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


def sse_headers() -> dict[str, str]:
    return {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
