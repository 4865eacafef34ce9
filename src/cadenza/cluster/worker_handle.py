"""How the router reaches a worker: an async handle, in-process or remote.

The router only ever talks to workers through ``WorkerHandle`` — typed engine commands, one
``pull`` per batch of steps, and ``move_kv`` (export here, import there). ``LocalWorker`` runs
the worker's engine thread in this process (tests, and a cluster without Ray);
``cluster/ray_backend.py`` (the one module that imports Ray) puts each worker in a Ray actor,
and ``move_kv`` then carries the KV bytes through Ray's object store, worker to worker, without
passing through the router.

A handle whose worker died raises ``WorkerDiedError`` from every call until the worker is back.
"""

from __future__ import annotations

import asyncio
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from cadenza.cluster.worker_loop import WorkerBatch, WorkerInfo, WorkerLoop
from cadenza.config import EngineConfig
from cadenza.engine_api import AbortRequest, EngineCommand, ExportKV, ImportKV, ImportResult
from cadenza.kvstore.kv_export import KVExport


def worker_config(config: EngineConfig, worker_id: str, threads: int | None = None) -> EngineConfig:
    """A worker's engine config: its own disk-tier directory (``<kv_disk_path>/<worker id>``,
    so a restarted worker finds its own blocks again) and its torch threads."""
    cache = config.cache
    if cache.kv_disk_path:
        cache = replace(cache, kv_disk_path=os.path.join(cache.kv_disk_path, worker_id))
    if threads is not None:
        config = replace(config, num_threads=threads)
    return replace(config, cache=cache)


class WorkerDiedError(RuntimeError):
    """The worker's process (or engine) is gone; what it cached is lost."""


@dataclass(frozen=True)
class StopExport:
    """A stopped request's KV and the output tokens it had generated when it stopped."""

    export: KVExport | None
    output_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class MoveResult:
    """The outcome of moving KV between workers."""

    imported: ImportResult | None  # None: there was nothing to move
    num_bytes: int
    output_token_ids: tuple[int, ...] | None = None  # a stopped request's output so far


def run_export(engine: Any, command: ExportKV | AbortRequest) -> KVExport | StopExport:
    """Execute an export (or a stop-and-export) on the engine thread."""
    if isinstance(command, ExportKV):
        return engine.handle(command)
    request = engine.scheduler.requests.get(command.request_id)
    tokens = tuple(request.output_token_ids) if request is not None else ()
    export = engine.stop_and_export(command.request_id, command.reason)
    return StopExport(export, tokens if export is not None else ())


def run_import(engine: Any, payload: KVExport | StopExport) -> MoveResult:
    """Install a moved export on the engine thread (the destination's half of ``move_kv``)."""
    if isinstance(payload, StopExport):
        export, tokens = payload.export, payload.output_token_ids
    else:
        export, tokens = payload, None
    if export is None or not export.blocks:
        return MoveResult(None, 0, tokens)
    return MoveResult(engine.handle(ImportKV(export)), export.nbytes, tokens)


class WorkerHandle(ABC):
    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id

    @abstractmethod
    async def call(self, command: EngineCommand) -> Any:
        """Execute one engine command on the worker."""

    @abstractmethod
    async def pull(self, timeout_s: float) -> WorkerBatch:
        """What the worker did since the previous pull (waits up to ``timeout_s``)."""

    @abstractmethod
    async def info(self) -> WorkerInfo:
        """The worker's fixed facts (raises ``WorkerDiedError`` while it is down)."""

    @abstractmethod
    async def tokenizer(self) -> Any:
        """The worker's tokenizer (every worker serves the same model)."""

    @abstractmethod
    async def move_kv(self, dest: WorkerHandle, command: ExportKV | AbortRequest) -> MoveResult:
        """Export KV here (``ExportKV``, or a stop-and-export ``AbortRequest``) and import it
        at ``dest``."""

    @abstractmethod
    def kill(self) -> None:
        """End the worker abruptly, as a crash would (tests and fault drills)."""

    @abstractmethod
    async def close(self) -> None:
        """Let the worker finish its copies and stop."""

    async def call_many(self, commands: Sequence[EngineCommand]) -> list[Any]:
        return [await self.call(c) for c in commands]


class LocalWorker(WorkerHandle):
    """A worker whose engine thread lives in this process."""

    def __init__(self, worker_id: str, factory: Callable[[], Any]) -> None:
        super().__init__(worker_id)
        self._factory = factory
        self._loop: WorkerLoop | None = WorkerLoop(worker_id, factory)

    def _live(self) -> WorkerLoop:
        if self._loop is None:
            raise WorkerDiedError(f"worker {self.worker_id} is down")
        return self._loop

    async def call(self, command: EngineCommand) -> Any:
        loop = self._live()
        return await asyncio.wrap_future(loop.submit(lambda engine: engine.handle(command)))

    async def pull(self, timeout_s: float) -> WorkerBatch:
        loop = self._live()
        batch = await asyncio.to_thread(loop.pull, timeout_s)
        if self._loop is not loop:
            raise WorkerDiedError(f"worker {self.worker_id} died")
        return batch

    async def info(self) -> WorkerInfo:
        return await asyncio.to_thread(self._live().info)

    async def tokenizer(self) -> Any:
        return self._live().tokenizer()

    async def move_kv(self, dest: WorkerHandle, command: ExportKV | AbortRequest) -> MoveResult:
        assert isinstance(dest, LocalWorker)
        source = self._live()
        payload = await asyncio.wrap_future(source.submit(lambda e: run_export(e, command)))
        target = dest._live()
        return await asyncio.wrap_future(target.submit(lambda e: run_import(e, payload)))

    def kill(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.close(timeout_s=0)

    def restart(self) -> None:
        """Start a fresh engine (the worker came back; its disk tier is where it was)."""
        if self._loop is None:
            self._loop = WorkerLoop(self.worker_id, self._factory)

    async def close(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            await asyncio.to_thread(loop.close)
