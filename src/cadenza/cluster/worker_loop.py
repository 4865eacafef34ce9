"""One cluster worker's engine, on its own thread, driven by typed commands from any thread.

The worker process (a Ray actor, or the router's own process for in-process workers) holds one
``WorkerLoop``. Its engine thread owns the engine exclusively: it builds it, runs the commands
it is sent, steps while requests are unfinished, and after every step or command drains the
engine's KV events. A caller collects everything that happened since its last call with
``pull`` — outputs of every request, KV events (the first pull starts with a snapshot of every
tier), and the current load — in one round trip, so a remote router pays one call per step
batch rather than one per token.

Ray-free and torch-free: the factory passed in builds the engine.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from cadenza.core.engine_core import LoadSnapshot
from cadenza.core.kv_events import KVEvent
from cadenza.engine_api import DrainEvents, EngineCommand, GetLoad
from cadenza.outputs import RequestOutput

log = logging.getLogger("cadenza.worker")


@dataclass
class WorkerBatch:
    """What a worker did since the previous pull."""

    outputs: list[RequestOutput] = field(default_factory=list)
    events: list[KVEvent] = field(default_factory=list)
    load: LoadSnapshot | None = None
    step_s: float = 0.0  # engine time spent in steps
    num_steps: int = 0


@dataclass(frozen=True)
class WorkerInfo:
    """Facts about a worker that do not change while it lives."""

    worker_id: str
    pid: int
    num_blocks: int
    block_size: int
    block_bytes: int
    host_slots: int
    disk_capacity_bytes: int
    max_model_len: int
    fingerprint: str


class WorkerLoop:
    def __init__(self, worker_id: str, factory: Callable[[], Any]) -> None:
        self.worker_id = worker_id
        self._cv = threading.Condition()
        self._commands: list[tuple[Callable[[Any], Any], Future[Any]]] = []
        self._batch = WorkerBatch()
        self._stop = False
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.engine: Any = None
        self._thread = threading.Thread(
            target=self._run, args=(factory,), name=f"cadenza-{worker_id}", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    # ------------------------------------------------------------------ engine thread
    def _run(self, factory: Callable[[], Any]) -> None:
        try:
            self.engine = factory()
            self._collect_events(self.engine)  # subscribes: the first pull gets a snapshot
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        engine = self.engine
        while True:
            with self._cv:
                busy = engine.has_unfinished_requests()
                if not self._commands and not busy and not self._stop:
                    self._cv.wait(0.05)
                if self._stop and not self._commands:
                    break
                commands, self._commands = self._commands, []
            for fn, future in commands:
                try:
                    future.set_result(fn(engine))
                except BaseException as exc:  # the caller gets it
                    future.set_exception(exc)
            if engine.has_unfinished_requests():
                self._step(engine)
            self._collect_events(engine)
        try:
            engine.close()
        except Exception:
            log.exception("closing the engine of %s failed", self.worker_id)

    def _step(self, engine: Any) -> None:
        start = time.perf_counter()
        try:
            outputs = engine.step()
        except Exception:
            log.exception("engine step failed on %s", self.worker_id)
            raise
        elapsed = time.perf_counter() - start
        with self._cv:
            self._batch.outputs += outputs
            self._batch.step_s += elapsed
            self._batch.num_steps += 1
            self._cv.notify_all()

    def _collect_events(self, engine: Any) -> None:
        events = engine.handle(DrainEvents())
        load = engine.handle(GetLoad())
        with self._cv:
            if events:
                self._batch.events += events
                self._cv.notify_all()
            self._batch.load = load

    # ------------------------------------------------------------------ any thread
    def submit(self, fn: Callable[[Any], Any]) -> Future[Any]:
        """Run ``fn(engine)`` on the engine thread; its result comes back in the future."""
        future: Future[Any] = Future()
        with self._cv:
            if self._stop:
                raise RuntimeError(f"worker {self.worker_id} is shutting down")
            self._commands.append((fn, future))
            self._cv.notify_all()
        return future

    def call(self, command: EngineCommand, timeout_s: float | None = None) -> Any:
        return self.submit(lambda engine: engine.handle(command)).result(timeout_s)

    def call_many(self, commands: Sequence[EngineCommand]) -> list[Any]:
        """Several commands in one go on the engine thread: no step runs between them."""
        return self.submit(lambda engine: [engine.handle(c) for c in commands]).result()

    def pull(self, timeout_s: float = 0.5) -> WorkerBatch:
        """Outputs, KV events and load since the previous pull; waits up to ``timeout_s`` for
        something to report."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while not (self._batch.outputs or self._batch.events):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop:
                    break
                self._cv.wait(remaining)
            batch, self._batch = self._batch, WorkerBatch(load=self._batch.load)
        return batch

    def info(self) -> WorkerInfo:
        def read(engine: Any) -> WorkerInfo:
            stats = engine.stats()
            return WorkerInfo(
                worker_id=self.worker_id,
                pid=os.getpid(),
                num_blocks=engine.num_total_blocks,
                block_size=engine.config.cache.block_size,
                block_bytes=engine.runner.bytes_per_block(),
                host_slots=stats.load.host_blocks_total,
                disk_capacity_bytes=stats.disk_capacity_bytes,
                max_model_len=engine.max_model_len,
                fingerprint=engine.fingerprint,
            )

        return self.submit(read).result()

    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def close(self, timeout_s: float = 30.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout_s)
