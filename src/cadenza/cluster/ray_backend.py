"""Workers as Ray actors — the only module of Cadenza that imports Ray.

Each worker is a threaded Ray actor holding one ``WorkerLoop`` (one engine on its own thread),
so a long ``pull`` and a command run side by side. Moving KV is ``move_kv``: the source actor's
export is a Ray object that the destination actor's import takes as its argument, so the bytes
go worker to worker through the object store (shared memory on one node) and never through
the router.

Actors restart when their process dies (``max_restarts=-1``): the restarted worker builds a
fresh engine, keeps its disk tier (same path), and announces it in its first KV-event snapshot.
Calls made while an actor is down raise ``WorkerDiedError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayActorError

from cadenza.cluster.worker_handle import (
    MoveResult,
    WorkerDiedError,
    WorkerHandle,
    run_export,
    run_import,
    worker_config,
)
from cadenza.cluster.worker_loop import WorkerBatch, WorkerInfo, WorkerLoop
from cadenza.config import EngineConfig
from cadenza.engine_api import AbortRequest, EngineCommand, ExportKV


class EngineWorkerActor:
    """The body of a worker actor (wrapped with ``ray.remote`` in ``start_workers``)."""

    def __init__(
        self, worker_id: str, config: EngineConfig, source_factory: Callable[[], Any] | None
    ) -> None:
        from cadenza.engine import LLMEngine  # torch loads in the worker process only

        def build() -> Any:
            return LLMEngine(config, source_factory() if source_factory is not None else None)

        self.loop = WorkerLoop(worker_id, build)

    def call(self, command: EngineCommand) -> Any:
        return self.loop.call(command)

    def pull(self, timeout_s: float) -> WorkerBatch:
        return self.loop.pull(timeout_s)

    def info(self) -> WorkerInfo:
        return self.loop.info()

    def tokenizer(self) -> Any:
        return self.loop.tokenizer()

    def export(self, command: ExportKV | AbortRequest) -> Any:
        return self.loop.submit(lambda engine: run_export(engine, command)).result()

    def import_moved(self, payload: Any) -> MoveResult:
        return self.loop.submit(lambda engine: run_import(engine, payload)).result()

    def pid(self) -> int:
        return os.getpid()


class RayWorker(WorkerHandle):
    def __init__(self, worker_id: str, actor: Any) -> None:
        super().__init__(worker_id)
        self.actor = actor
        self._pid: int | None = None

    async def _await(self, ref: Any) -> Any:
        try:
            return await ref
        except RayActorError as exc:
            raise WorkerDiedError(f"worker {self.worker_id} is down: {exc}") from None

    async def call(self, command: EngineCommand) -> Any:
        return await self._await(self.actor.call.remote(command))

    async def pull(self, timeout_s: float) -> WorkerBatch:
        return await self._await(self.actor.pull.remote(timeout_s))

    async def info(self) -> WorkerInfo:
        info = await self._await(self.actor.info.remote())
        self._pid = info.pid
        return info

    async def tokenizer(self) -> Any:
        return await self._await(self.actor.tokenizer.remote())

    async def move_kv(self, dest: WorkerHandle, command: ExportKV | AbortRequest) -> MoveResult:
        assert isinstance(dest, RayWorker)
        exported = self.actor.export.remote(command)
        try:
            return await dest._await(dest.actor.import_moved.remote(exported))
        except WorkerDiedError:
            # Tell which side failed: the source's export raises its own error.
            await self._await(exported)
            raise

    def kill(self) -> None:
        """SIGKILL the actor's process, as a crash would (Ray then restarts it)."""
        if self._pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)

    async def close(self) -> None:
        with contextlib.suppress(Exception):  # already gone
            ray.kill(self.actor, no_restart=True)


def start_workers(
    num_workers: int,
    config: EngineConfig,
    *,
    threads_per_worker: int = 1,
    address: str | None = None,
    source_factory: Callable[[], Any] | None = None,
    configure: Callable[[int, EngineConfig], EngineConfig] | None = None,
) -> list[RayWorker]:
    """Start (or join, with ``address``) a Ray cluster and one actor per worker. Each worker
    gets its own disk-tier directory (``<kv_disk_path>/<worker id>``) so a restarted worker
    finds its own blocks again."""
    if not ray.is_initialized():
        if address:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        else:
            ray.init(
                num_cpus=max(os.cpu_count() or 1, num_workers * threads_per_worker),
                include_dashboard=False,
                ignore_reinit_error=True,
                log_to_driver=False,
                _node_ip_address="127.0.0.1",
            )
    actor_class = ray.remote(EngineWorkerActor)
    env = {"OMP_NUM_THREADS": str(threads_per_worker), "MKL_NUM_THREADS": str(threads_per_worker)}
    handles = []
    for i in range(num_workers):
        worker_id = f"w{i}"
        cfg = worker_config(config, worker_id, threads_per_worker)
        if configure is not None:
            cfg = configure(i, cfg)
        actor = actor_class.options(
            num_cpus=0,
            max_restarts=-1,
            max_concurrency=16,
            runtime_env={"env_vars": env},
            name=None,
        ).remote(worker_id, cfg, source_factory)
        handles.append(RayWorker(worker_id, actor))
    return handles


async def wait_ready(handles: list[RayWorker], timeout_s: float = 300.0) -> list[WorkerInfo]:
    """Every worker's info once its engine has loaded."""
    return await asyncio.wait_for(asyncio.gather(*(h.info() for h in handles)), timeout_s)


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()
