"""The engines a trace replay runs on: one in-process engine, or the cluster router over N
workers (threads of this process, or Ray actors), built from one ``TraceReplayConfig``.

Everything here is what ``cadenza serve`` builds (``AsyncEngine`` over ``LLMEngine``, or
``ClusterEngine`` over ``LocalWorker`` / Ray handles), with the settings the simulator's
``SimConfig`` names mapped one to one onto engine knobs (device blocks, host and disk tier
sizes in blocks, step budget, running cap, eviction policy). Each worker is warmed up with one
short request before the replay's clock starts — shorter than a block, so it leaves no cached
KV behind — because a model's first forward passes are slower than the rest and the
simulator's cost model prices steady-state steps.

Observation only, nothing in the engines changes: per-worker steps and busy time are read
from ``on_step`` (one engine) or by wrapping each handle's ``pull`` on the instance (cluster,
the same trick the replay benchmark uses on the scheduler); the router's migrations by
wrapping ``stats.record_migration``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cadenza.cluster.placement import CostParams
from cadenza.core.sampling_params import SamplingParams
from cadenza.engine_api import AddRequest, EngineRequest, GetLoad, GetStats
from cadenza.sim.metrics import MigrationRecord
from cadenza.sim.synthetic_tokens import synthetic_tokens

# The warm-up prompt and reply together stay under one block, so nothing is cached.
WARMUP_PROMPT_TOKENS = 8
WARMUP_OUTPUT_TOKENS = 4
# The router's migration kinds as the simulator's triggers.
TRIGGERS = {"hint": "hint", "turn": "placement"}


@dataclass
class Observed:
    """What the replay saw the engines do, besides the turns' own outputs."""

    steps: Counter[str] = field(default_factory=Counter)
    busy_s: Counter[str] = field(default_factory=Counter)
    migrations: list[MigrationRecord] = field(default_factory=list)


@dataclass
class Running:
    """A started engine (``AsyncEngine`` or ``ClusterEngine``) and how to read and stop it."""

    engine: Any
    vocab_size: int
    block_size: int
    details: dict[str, Any]
    observed: Observed
    is_cluster: bool

    async def worker_stats(self) -> dict[str, Any]:
        if self.is_cluster:
            return dict(await self.engine.worker_stats())
        return {"w0": await self.engine.call(GetStats())}

    def placements(self) -> dict[str, int]:
        if not self.is_cluster:
            return {}
        stats = self.engine.stats
        outcomes = {f"hint-outcome:{k}": v for k, v in stats.hint_outcomes.items()}
        return {**stats.placements, **outcomes}

    async def close(self) -> None:
        if self.is_cluster:
            await self.engine.aclose()
        else:
            await asyncio.to_thread(self.engine.shutdown)


def engine_options(config: Any, disk_path: str | None, block_bytes: int) -> dict[str, Any]:
    """The engine knobs of a replay config (``TraceReplayConfig``): tier sizes in blocks, as
    the simulator sizes them (``GiB // block bytes``)."""
    gib = 2**30
    host = int(config.host_gib * gib // block_bytes)
    disk = int(config.disk_gib * gib // block_bytes)
    options: dict[str, Any] = {
        "model": config.model,
        "block_size": config.block_size,
        "max_num_batched_tokens": config.max_num_batched_tokens,
        "max_num_seqs": config.max_num_seqs,
        "kv_eviction_policy": config.eviction,
        "kv_cost_model": config.kv_cost_model,
        "num_threads": config.threads,
    }
    if config.num_blocks is not None:
        options["num_kv_blocks"] = config.num_blocks
    else:
        options["kv_cache_memory_gib"] = config.kv_cache_gib
    if host > 0:
        options["host_num_blocks"] = host
    if disk > 0:
        if disk_path is None:
            raise ValueError("a disk tier needs a directory")
        options["disk_num_blocks"] = disk
        options["kv_disk_path"] = disk_path
    return options


def block_bytes_of(source: Any, block_size: int) -> int:
    """Bytes of one KV block of ``source``'s model in the dtype the engine will pick (float32
    on a CPU, bfloat16 on CUDA), to size the tiers in blocks before the engine exists."""
    from cadenza.runner.model_runner import resolve_device, resolve_dtype

    itemsize = resolve_dtype("auto", resolve_device("auto")).itemsize
    c = source.config
    return (
        2
        * c.num_hidden_layers
        * c.num_key_value_heads
        * c.resolved_head_dim
        * block_size
        * itemsize
    )


def _warmup_request(worker_id: str, vocab_size: int) -> EngineRequest:
    tokens = synthetic_tokens(f"warmup/{worker_id}", WARMUP_PROMPT_TOKENS, vocab_size)
    params = SamplingParams(max_tokens=WARMUP_OUTPUT_TOKENS, ignore_eos=True)
    return EngineRequest.of(f"warmup-{worker_id}", tokens, sampling_params=params)


async def start_single(config: Any, source: Any, disk_path: str | None) -> Running:
    from cadenza.config import EngineConfig
    from cadenza.engine import LLMEngine
    from cadenza.server.async_engine import AsyncEngine

    options = engine_options(config, disk_path, block_bytes_of(source, config.block_size))
    engine_config = EngineConfig.from_options(**options)
    observed = Observed()

    def on_step(outputs: list[Any], seconds: float) -> None:
        observed.steps["w0"] += 1
        observed.busy_s["w0"] += seconds

    engine = await asyncio.to_thread(
        AsyncEngine,
        lambda: LLMEngine(engine_config, source),
        max_waiting=1 << 30,
        on_step=on_step,
    )
    vocab = source.config.vocab_size
    async for _ in engine.generate(_warmup_request("w0", vocab)):
        pass
    observed.steps.clear()
    observed.busy_s.clear()
    inner = engine.engine
    details = {
        "num_blocks": inner.num_total_blocks,
        "block_bytes": inner.runner.bytes_per_block(),
        "engine_options": options,
    }
    return Running(engine, vocab, config.block_size, details, observed, is_cluster=False)


def _local_handles(config: Any, engine_config: Any, source: Any) -> list[Any]:
    from cadenza.cluster.worker_handle import LocalWorker, worker_config
    from cadenza.engine import LLMEngine

    def factory(cfg: Any) -> Callable[[], Any]:
        return lambda: LLMEngine(cfg, source)

    return [
        LocalWorker(f"w{i}", factory(worker_config(engine_config, f"w{i}")))
        for i in range(config.workers)
    ]


def _ray_handles(config: Any, engine_config: Any, source: Any) -> list[Any]:
    from cadenza.cluster.ray_backend import start_workers

    return list(
        start_workers(
            config.workers,
            engine_config,
            threads_per_worker=config.threads or 1,
            source_factory=(lambda: source) if source is not None else None,
        )
    )


def _observe_pulls(handle: Any, observed: Observed) -> None:
    """Count each worker's steps and step time from its pulls; the first pull is left out (it
    carries the warm-up, which the router's first pull collects before any turn arrives)."""
    pull = handle.pull
    first = [True]

    async def observed_pull(timeout_s: float) -> Any:
        batch = await pull(timeout_s)
        if first[0]:
            first[0] = False
            return batch
        observed.steps[handle.worker_id] += batch.num_steps
        observed.busy_s[handle.worker_id] += batch.step_s
        return batch

    handle.pull = observed_pull


def _observe_migrations(router: Any, observed: Observed) -> None:
    stats = router.stats
    record = stats.record_migration

    def observed_record(m: Any) -> None:
        record(m)
        if m.ok and m.num_bytes > 0:
            done = router.clock()
            observed.migrations.append(
                MigrationRecord(
                    session_id="",
                    src=m.src,
                    dst=m.dst,
                    trigger=TRIGGERS.get(m.kind, m.kind),
                    blocks=m.num_bytes // max(router.costs.block_bytes, 1),
                    bytes=m.num_bytes,
                    start_s=done - m.duration_s,
                    done_s=done,
                )
            )

    stats.record_migration = observed_record


async def _warm_worker(handle: Any, vocab_size: int) -> None:
    await handle.call(AddRequest(_warmup_request(handle.worker_id, vocab_size)))
    while True:
        load = await handle.call(GetLoad())
        if load.num_running == 0 and load.num_waiting == 0:
            return
        await asyncio.sleep(0.02)


async def start_cluster(
    config: Any, source: Any, disk_path: str | None, costs: CostParams | None
) -> Running:
    from cadenza.cluster.router import ClusterEngine
    from cadenza.config import EngineConfig

    options = engine_options(config, disk_path, block_bytes_of(source, config.block_size))
    if config.cluster_backend == "local":
        options["num_threads"] = config.threads or 1
    engine_config = EngineConfig.from_options(**options)
    make = _local_handles if config.cluster_backend == "local" else _ray_handles
    handles = await asyncio.to_thread(make, config, engine_config, source)
    vocab = source.config.vocab_size
    await asyncio.gather(*(_warm_worker(h, vocab) for h in handles))
    observed = Observed()
    for handle in handles:
        _observe_pulls(handle, observed)
    infos = await asyncio.gather(*(h.info() for h in handles))
    block_bytes = infos[0].block_bytes
    router_costs = costs or CostParams(
        block_bytes=block_bytes, rebalance_margin=config.rebalance_margin
    )
    router = await ClusterEngine.connect(
        handles,
        engine_config,
        routing=config.routing,
        max_waiting=1 << 30,
        clock=time.monotonic,
        costs=router_costs,
    )
    _observe_migrations(router, observed)
    await router.start()
    details = {
        "num_blocks": infos[0].num_blocks,
        "block_bytes": block_bytes,
        "host_slots": infos[0].host_slots,
        "engine_options": options,
        "router_costs": {
            "prefill_s_per_token": router_costs.prefill_s_per_token,
            "link_bytes_per_s": router_costs.link_bytes_per_s,
            "rebalance_margin": router_costs.rebalance_margin,
        },
    }
    return Running(router, vocab, config.block_size, details, observed, is_cluster=True)
