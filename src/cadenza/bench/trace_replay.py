"""``cadenza bench replay --trace FILE``: a session trace on the real engine, with the
simulator's metrics.

    cadenza bench replay --trace t.jsonl --out engine.json                  # one engine
    cadenza bench replay --trace t.jsonl --workers 2 --cluster-backend local --out c.json
    cadenza simulate --trace t.jsonl --cost-model cpu --out sim.json        # the same, predicted

The trace is driven open-loop on the wall clock by ``trace_replay_client`` (the simulated
client's semantics: history + new tokens, think times from the previous answer, hints
``hint_lead_s`` ahead, tool calls) against one in-process engine (``--workers 1``) or the
cluster router over N workers (``trace_replay_engines``). Every turn becomes the simulator's
``TurnRecord`` and the run's metrics are ``sim.metrics.build_metrics`` with source
``"engine"``: the same JSON schema as ``cadenza simulate --trace``, so the two compare key by
key. The settings that shape both runs have the simulator's names and defaults
(``TraceReplayConfig`` mirrors ``SimConfig``; ``sim_config`` maps one onto the other).

Idle time is not skipped: hint pins, retention TTLs and hint expiry run on the engine's clock,
so the replay takes as long as the trace's arrivals (plus the answers) take.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cadenza.cluster.placement import POLICY_NAMES, CostParams
from cadenza.sim.metrics import build_metrics, dumps_metrics
from cadenza.sim.out_path import out_file_problem
from cadenza.sim.trace import TraceTurn, read_trace

BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class TraceReplayConfig:
    """What a real-engine trace replay runs on. Field names and defaults follow
    ``sim.setup.SimConfig`` wherever both have the setting."""

    model: str = "smollm2-135m"
    workers: int = 1
    cluster_backend: str = "local"
    routing: str = "symphony"
    seed: int = 0
    block_size: int = 16
    num_blocks: int | None = None  # device KV blocks per worker (default: kv_cache_gib holds)
    kv_cache_gib: float = 1.0
    host_gib: float = 16.0
    disk_gib: float = 0.0
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    eviction: str = "cost"
    retention_ttl_s: float = 0.0
    rebalance_margin: int = CostParams.rebalance_margin
    threads: int | None = None  # torch threads per worker (cluster local: default 1)
    kv_cost_model: str = "profile"

    def __post_init__(self) -> None:
        if self.workers <= 0:
            raise ValueError("workers must be positive")
        if self.routing not in POLICY_NAMES:
            raise ValueError(f"routing must be one of {', '.join(POLICY_NAMES)}")
        if self.cluster_backend not in BACKENDS:
            raise ValueError(f"cluster backend must be one of {', '.join(BACKENDS)}")
        if self.host_gib < 0 or self.disk_gib < 0:
            raise ValueError("host_gib and disk_gib must not be negative")
        sim_config(self, None)  # the simulator's checks of every setting both have

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sim_config(config: TraceReplayConfig, calibration: str | None) -> Any:
    """The ``SimConfig`` that predicts ``config`` with the CPU cost model of ``calibration``.

    The simulator is given the ``symphony`` policy even for one worker: it is the policy
    whose hints reach the worker in the simulator (there, a policy without hint handling
    drops hints), while the real single engine always acts on them.
    """
    from cadenza.sim.setup import SimConfig

    routing = config.routing if config.workers > 1 else "symphony"
    return SimConfig(
        workers=config.workers,
        routing=routing,
        cost_model="cpu",
        model=config.model,
        seed=config.seed,
        block_size=config.block_size,
        num_blocks=config.num_blocks,
        kv_cache_gib=config.kv_cache_gib,
        host_gib=config.host_gib,
        disk_gib=config.disk_gib,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_num_seqs=config.max_num_seqs,
        eviction=config.eviction,
        retention_ttl_s=config.retention_ttl_s,
        rebalance_margin=config.rebalance_margin,
        calibration=calibration,
    )


def placement_costs(config: TraceReplayConfig, calibration: str | None) -> CostParams:
    """The router's cost parameters priced by the simulator's CPU cost model, so the real
    router and the simulated one weigh moving KV against recomputing it alike."""
    from cadenza.sim.setup import resolve

    return resolve(sim_config(config, calibration)).placement_costs


async def _replay(
    turns: Sequence[TraceTurn],
    config: TraceReplayConfig,
    source: Any,
    disk_path: str | None,
    costs: CostParams | None,
) -> dict[str, Any]:
    from cadenza.bench.trace_replay_client import TraceClient
    from cadenza.bench.trace_replay_engines import start_cluster, start_single

    if config.workers > 1:
        running = await start_cluster(config, source, disk_path, costs)
    else:
        running = await start_single(config, source, disk_path)
    try:
        client = TraceClient(
            running.engine,
            turns,
            seed=config.seed,
            vocab_size=running.vocab_size,
            retention_ttl_s=config.retention_ttl_s,
        )
        wall = time.perf_counter()
        result = await client.run()
        wall = time.perf_counter() - wall
        stats = await running.worker_stats()
    finally:
        await running.close()
    observed = running.observed
    turns_by_worker = Counter(r.worker for r in result.records)
    workers: dict[str, dict[str, Any]] = {}
    for worker_id, s in sorted(stats.items()):
        tiers = s.tier_stats
        workers[worker_id] = {
            "turns": turns_by_worker.get(worker_id, 0),
            "steps": observed.steps.get(worker_id, 0),
            "busy_s": observed.busy_s.get(worker_id, 0.0),
            "preemptions": s.load.num_preemptions,
            "offloaded_blocks": tiers["offloaded_blocks"],
            "persisted_blocks": tiers["persisted_blocks"],
            "fetched_blocks": sum(tiers["fetched_blocks"].values()),
            "dropped_blocks": tiers["dropped_blocks"],
        }
    details = {
        **running.details,
        "wall_s": wall,
        "hints_sent": result.hints_sent,
        "advice_errors": result.advice_errors,
    }
    return build_metrics(
        result.records,
        source="engine",
        config={**config.describe(), **details},
        migrations=observed.migrations,
        placements=running.placements(),
        workers=workers,
        rejected_turns=len(turns) - len(result.records),
    )


def replay_trace(
    turns: Sequence[TraceTurn],
    config: TraceReplayConfig,
    *,
    source: Any = None,
    disk_path: str | None = None,
    costs: CostParams | None = None,
) -> dict[str, Any]:
    """Run ``turns`` on the real engine(s) of ``config``; the metrics (``cadenza.trace-
    metrics/1``, source ``engine``). ``source``: a loaded model (default: load
    ``config.model``); ``disk_path``: the disk tier's directory (default: a temporary one);
    ``costs``: the cluster router's cost parameters (default: the server's)."""
    if source is None:
        from cadenza.model.source import load_model_source

        source = load_model_source(config.model)
    if config.disk_gib > 0 and disk_path is None:
        with tempfile.TemporaryDirectory(prefix="cadenza-trace-replay-") as tmp:
            return asyncio.run(_replay(turns, config, source, tmp, costs))
    return asyncio.run(_replay(turns, config, source, disk_path, costs))


# ------------------------------------------------------------------------------ CLI


# Flags of the --trace mode: (flag, TraceReplayConfig field, type, choices, help). Their
# parsed default is None (the ShareGPT mode records every non-None flag in its command line),
# and ``config_from_args`` fills in the config's default.
_TRACE_FLAGS: tuple[tuple[str, str, type, tuple[str, ...] | None, str], ...] = (
    ("--workers", "workers", int, None, "engines (>1: the cluster router)"),
    (
        "--cluster-backend",
        "cluster_backend",
        str,
        BACKENDS,
        "with --workers > 1: worker threads in this process, or Ray actors",
    ),
    ("--routing", "routing", str, POLICY_NAMES, "with --workers > 1: the placement policy"),
    ("--block-size", "block_size", int, None, "tokens per KV block"),
    (
        "--num-blocks",
        "num_blocks",
        int,
        None,
        "device KV blocks per worker (unset: what --kv-cache-gib holds)",
    ),
    ("--kv-cache-gib", "kv_cache_gib", float, None, "device KV pool GiB per worker"),
    ("--host-gib", "host_gib", float, None, "host KV tier GiB per worker"),
    ("--disk-gib", "disk_gib", float, None, "disk KV tier GiB per worker (in --disk-path)"),
    ("--max-num-batched-tokens", "max_num_batched_tokens", int, None, "step token budget"),
    ("--max-num-seqs", "max_num_seqs", int, None, "most running requests per worker"),
    ("--eviction", "eviction", str, ("cost", "lru"), "device eviction policy"),
    (
        "--retention-ttl-s",
        "retention_ttl_s",
        float,
        None,
        "KV retention after a turn without tool_s in the trace",
    ),
    (
        "--rebalance-margin",
        "rebalance_margin",
        int,
        None,
        "symphony moves a hinted session only to a worker this much less loaded",
    ),
    (
        "--kv-cost-model",
        "kv_cost_model",
        str,
        ("profile", "linear"),
        "recompute cost profile of cost-aware eviction (profile: measured at start)",
    ),
)


def add_trace_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--trace`` mode's flags of ``cadenza bench replay`` (the ShareGPT mode's
    ``--model``, ``--seed`` (here: of the token ids), ``--threads`` and ``--disk-path`` are
    shared)."""
    d = TraceReplayConfig()
    g = parser.add_argument_group(
        "session trace (--trace)",
        "replay a session trace on the real engine; the metrics are `cadenza simulate`'s",
    )
    g.add_argument(
        "--trace", default=None, help="a session trace (.jsonl[.gz]) to run instead of ShareGPT"
    )
    g.add_argument("--out", default=None, help="--trace: the metrics JSON (default: stdout)")
    for flag, name, kind, choices, text in _TRACE_FLAGS:
        default = getattr(d, name)
        g.add_argument(
            flag,
            dest=name,
            type=kind,
            choices=choices,
            default=None,
            help=f"--trace: {text}" + ("" if default is None else f" (default: {default})"),
        )
    g.add_argument(
        "--calibration",
        default=None,
        help="--trace with --workers > 1: price the router's placement with this `cadenza "
        "simulate calibrate` file, as the simulator does (default: the server's costs)",
    )


def config_from_args(args: argparse.Namespace) -> TraceReplayConfig:
    """The replay config of parsed flags (an unset flag takes the config's default)."""
    given = {name: getattr(args, name) for _, name, *_ in _TRACE_FLAGS}
    return TraceReplayConfig(
        model=args.model,
        seed=args.seed,
        threads=args.threads,
        **{k: v for k, v in given.items() if v is not None},
    )


def run_trace(args: argparse.Namespace) -> int:
    """``cadenza bench replay --trace FILE``."""
    problem = out_file_problem(args.out) if args.out else None
    if problem is not None:
        raise ValueError(problem)
    config = config_from_args(args)
    turns = read_trace(args.trace)
    costs = placement_costs(config, args.calibration) if args.calibration else None
    metrics = replay_trace(turns, config, disk_path=args.disk_path, costs=costs)
    text = dumps_metrics(metrics)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
        print(
            f"replayed {metrics['turns']} turns ({metrics['rejected_turns']} rejected) in"
            f" {metrics['duration_s']:.1f} s on {config.workers} worker(s); mean TTFT"
            f" {metrics['ttft_s']['mean']:.3f} s; metrics in {args.out}",
            file=sys.stderr,
        )
    else:
        sys.stdout.write(text)
    return 0
