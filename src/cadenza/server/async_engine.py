"""AsyncEngine: the synchronous ``LLMEngine`` on its own thread, driven from asyncio.

The engine (model, block pool, scheduler, store) is touched by exactly one thread, the engine
thread: it is built there, steps there, and every other access is a command queued to it. Any
number of HTTP handlers submit commands and read their requests' outputs from per-request
asyncio queues, so one slow or disconnected client never blocks the others. A stream that is
closed before its request finishes (client gone) aborts the request, which frees its blocks.
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
from typing import Any, TypeVar

from cadenza.engine import LLMEngine
from cadenza.outputs import RequestOutput

log = logging.getLogger("cadenza.server")
T = TypeVar("T")


class QueueFullError(RuntimeError):
    """Too many requests waiting; the client should retry after ``retry_after_s``."""

    def __init__(self, waiting: int, retry_after_s: int = 1) -> None:
        super().__init__(f"the server is at capacity ({waiting} requests waiting); retry later")
        self.retry_after_s = retry_after_s


class EngineStoppedError(RuntimeError):
    """The engine is shutting down (or failed) and takes no new work."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]


class AsyncEngine:
    def __init__(
        self,
        factory: Callable[[], LLMEngine],
        *,
        max_waiting: int = 256,
        on_step: Callable[[LLMEngine, list[RequestOutput], float], None] | None = None,
    ) -> None:
        self.max_waiting = max_waiting
        self.on_step = on_step
        self._commands: queue.SimpleQueue[Callable[[LLMEngine], None]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._accepting = True
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self.engine: LLMEngine | None = None
        self._thread = threading.Thread(
            target=self._run, args=(factory,), name="cadenza-engine", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    # ------------------------------------------------------------------ engine thread
    def _run(self, factory: Callable[[], LLMEngine]) -> None:
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

    def _drain(self, engine: LLMEngine, block: bool) -> None:
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

    def _step(self, engine: LLMEngine) -> None:
        start = time.perf_counter()
        try:
            outputs = engine.step()
        except Exception as exc:
            log.exception("engine step failed; failing the requests in flight")
            for request_id in list(self._streams):
                engine.abort_request(request_id)
                self._deliver(request_id, RuntimeError(f"engine step failed: {exc}"))
            return
        for output in outputs:
            self._deliver(output.request_id, output)
        if self.on_step is not None:
            try:
                self.on_step(engine, outputs, time.perf_counter() - start)
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
    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` on the engine thread and return its result (or raise its error)."""
        if self._stop.is_set() or not self._thread.is_alive():
            raise EngineStoppedError("the engine is shutting down")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def run(engine: LLMEngine) -> None:
            try:
                result = fn(engine)
            except BaseException as exc:
                loop.call_soon_threadsafe(_set_exception, future, exc)
            else:
                loop.call_soon_threadsafe(_set_result, future, result)

        self._commands.put(run)
        return await future

    async def generate(
        self, submit: Callable[[LLMEngine, str], Any], request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request with ``submit(engine, request_id)`` (``engine.add_request`` or
        ``engine.add_turn``) and yield its outputs as they come. Raises ``QueueFullError``,
        ``EngineStoppedError`` or the engine's ``ValueError`` before the first output."""
        if not self._accepting:
            raise EngineStoppedError("the server is shutting down and takes no new requests")
        request_id = request_id or f"req-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue())

        def add(engine: LLMEngine) -> None:
            waiting = len(engine.scheduler.waiting)
            if waiting >= self.max_waiting:
                raise QueueFullError(waiting)
            self._streams[request_id] = stream
            try:
                submit(engine, request_id)
            except BaseException:
                self._streams.pop(request_id, None)
                raise

        await self.call(add)
        finished = False
        try:
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
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread (a disconnected client); frees its blocks."""

        def run(engine: LLMEngine) -> None:
            self._streams.pop(request_id, None)
            engine.abort_request(request_id)

        self._commands.put(run)

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    def stop_accepting(self) -> None:
        self._accepting = False

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop taking requests, let those in flight finish, then close the engine (which
        flushes queued KV copies and closes the store cleanly)."""
        self._accepting = False
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("engine still busy after %.0f s; aborting what is left", timeout_s)

            def abort_all(engine: LLMEngine) -> None:
                for request_id in list(engine.scheduler.requests):
                    engine.abort_request(request_id)

            self._commands.put(abort_all)
            self._thread.join(timeout_s)


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
