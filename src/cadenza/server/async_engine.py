"""AsyncEngine: an engine on its own thread, driven from asyncio through the typed engine API.

The engine (model, block pool, scheduler) is touched by exactly one thread, the engine thread:
it is built there, steps there, and everything else reaches it as an ``engine_api`` command
(plain dataclasses — the same commands a remote worker takes). Any number of HTTP handlers
submit requests and read their outputs from per-request asyncio queues, so one slow or
disconnected client never blocks the others. A stream closed before its request finishes
(client gone) aborts the request, which frees its blocks — even while it still waits.

This module does not import the engine (or torch): the factory passed in builds it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cadenza.engine_api import AbortRequest, AddRequest, EngineCommand, EngineRequest, GetLoad
from cadenza.outputs import RequestOutput
from cadenza.server.worker_header import set_worker

log = logging.getLogger("cadenza.server")


class EngineLike(Protocol):
    """What the engine thread drives: ``LLMEngine`` (or anything with the same API)."""

    config: Any
    tokenizer: Any

    def handle(self, command: EngineCommand) -> Any: ...

    def step(self) -> list[RequestOutput]: ...

    def has_unfinished_requests(self) -> bool: ...

    def close(self) -> None: ...


class QueueFullError(RuntimeError):
    """Too many requests waiting; the client should retry after ``retry_after_s``."""

    def __init__(self, waiting: int, retry_after_s: int = 1) -> None:
        super().__init__(f"the server is at capacity ({waiting} requests waiting); retry later")
        self.retry_after_s = retry_after_s


class RequestAbortedError(RuntimeError):
    """The request was aborted before it finished (by its own client leaving, or by an
    operator); a reader still waiting for it gets this instead of waiting forever."""


class EngineStoppedError(RuntimeError):
    """The engine is shutting down (or failed) and takes no new work."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]


StepHook = Callable[[list[RequestOutput], float], None]


class AsyncEngine:
    def __init__(
        self,
        factory: Callable[[], EngineLike],
        *,
        max_waiting: int = 256,
        on_step: StepHook | None = None,
    ) -> None:
        self.max_waiting = max_waiting
        self.on_step = on_step
        self.worker_id = "w0"  # the one in-process worker (``X-Cadenza-Worker``)
        self._commands: queue.SimpleQueue[Callable[[EngineLike], None]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._accepting = True
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self.engine: EngineLike | None = None
        self._thread = threading.Thread(
            target=self._run, args=(factory,), name="cadenza-engine", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error
        assert self.engine is not None
        # Immutable facts about the engine, for the layers above it.
        self.config = self.engine.config
        self.tokenizer = self.engine.tokenizer

    # ------------------------------------------------------------------ engine thread
    def _run(self, factory: Callable[[], EngineLike]) -> None:
        try:
            self.engine = factory()
        except BaseException as exc:  # reported to the constructor's caller
            self._startup_error = exc
            self._ready.set()
            return
        self._ready.set()
        engine = self.engine
        while True:
            busy = engine.has_unfinished_requests()
            if self._stop.is_set() and not busy:
                break
            self._drain(engine, block=not busy)
            if engine.has_unfinished_requests():
                self._step(engine)
        try:
            engine.close()
        except Exception:
            log.exception("closing the engine failed")

    def _drain(self, engine: EngineLike, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.05) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            command(engine)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _step(self, engine: EngineLike) -> None:
        start = time.perf_counter()
        try:
            outputs = engine.step()
        except Exception as exc:
            log.exception("engine step failed; failing the requests in flight")
            for request_id in list(self._streams):
                engine.handle(AbortRequest(request_id, "error"))
                self._deliver(request_id, RuntimeError(f"engine step failed: {exc}"))
            return
        for output in outputs:
            self._deliver(output.request_id, output)
        if self.on_step is not None:
            try:
                self.on_step(outputs, time.perf_counter() - start)
            except Exception:
                log.exception("step observer failed")

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        if isinstance(item, BaseException) or item.finished:
            self._streams.pop(request_id, None)
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    # ------------------------------------------------------------------ asyncio side
    async def call(self, command: EngineCommand) -> Any:
        """Execute a typed command on the engine thread; returns its result (or raises)."""
        return await self._run_on_engine(lambda engine: engine.handle(command))

    async def _run_on_engine(self, fn: Callable[[EngineLike], Any]) -> Any:
        if self._stop.is_set() or not self._thread.is_alive():
            raise EngineStoppedError("the engine is shutting down")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def run(engine: EngineLike) -> None:
            try:
                result = fn(engine)
            except BaseException as exc:
                loop.call_soon_threadsafe(_set_exception, future, exc)
            else:
                loop.call_soon_threadsafe(_set_result, future, result)

        self._commands.put(run)
        return await future

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Submit ``request`` and yield its outputs as they come. Raises ``QueueFullError``,
        ``EngineStoppedError`` or the engine's ``ValueError`` before the first output.
        Closing the iterator before the request finished aborts it."""
        if not self._accepting:
            raise EngineStoppedError("the server is shutting down and takes no new requests")
        request_id = request.request_id
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue())

        def add(engine: EngineLike) -> None:
            waiting = engine.handle(GetLoad()).num_waiting
            if waiting >= self.max_waiting:
                raise QueueFullError(waiting)
            self._streams[request_id] = stream
            try:
                engine.handle(AddRequest(request))
            except BaseException:
                self._streams.pop(request_id, None)
                raise

        submitted = False
        finished = False
        try:
            await self._run_on_engine(add)
            submitted = True
            set_worker(self.worker_id)
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished and submitted:
                self.abort(request_id)

    def abort(self, request_id: str, reason: str = "client") -> None:
        """Abort a request from any thread (a disconnected client); frees its blocks."""

        def run(engine: EngineLike) -> None:
            stream = self._streams.pop(request_id, None)
            if stream is not None or reason != "client":
                engine.handle(AbortRequest(request_id, reason))
            if stream is not None:  # a reader still waiting (not the one that left) is told
                stream.loop.call_soon_threadsafe(
                    stream.queue.put_nowait, RequestAbortedError(f"request {request_id} aborted")
                )

        self._commands.put(run)

    def next_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    def stop_accepting(self) -> None:
        self._accepting = False

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop taking requests, let those in flight finish, then close the engine (which
        flushes queued KV copies)."""
        self._accepting = False
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("engine still busy after %.0f s; aborting what is left", timeout_s)

            def abort_all(engine: EngineLike) -> None:
                for request_id in list(self._streams):
                    engine.handle(AbortRequest(request_id, "shutdown"))
                    self._deliver(request_id, EngineStoppedError("the server shut down"))

            self._commands.put(abort_all)
            self._thread.join(timeout_s)


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
