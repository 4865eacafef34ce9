"""Prometheus metrics at ``GET /metrics``, named like vLLM's with a ``cadenza:`` prefix.

Two sources feed one per-server registry (never the process-global default one, so several
servers in one process, as in the tests, do not collide):

* **per request**, from the ``AsyncEngine`` ``on_step`` hook on the engine thread: latency
  histograms (TTFT, time per output token, end to end), prompt and generation token counters,
  where each prompt token came from (device / host / disk cache, recomputed history, new), and
  finished requests by reason. Prompt tokens are counted at a request's first output (when its
  prefill is done, so aborted requests still count what they computed); latencies and the
  finish reason when it finishes.
* **engine state**, read at scrape time by a command run on the engine thread (the only thread
  that may touch the engine): running / waiting requests, block usage of every tier, pinned
  blocks, and the counters the engine already keeps cumulatively (prefix-cache queries and
  hits, preemptions, swap bytes). Those are exported as they are, through a custom collector,
  rather than mirrored as deltas on every step: no double bookkeeping, nothing to drift, and no
  per-step cost.

``/metrics`` is not behind the API key (Prometheus scrapers rarely carry one; vLLM does the
same) and exposes only aggregates. ``request_success_total`` counts finished requests
(``stop`` and ``length``); requests aborted before finishing are counted by reason in
``request_aborted_total``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from cadenza.engine_api import EngineStats, GetStats
from cadenza.outputs import RequestOutput
from cadenza.server.errors import APIError
from cadenza.server.state import ServerState, get_state

log = logging.getLogger("cadenza.server")
router = APIRouter()

PREFIX = "cadenza:"
TOKEN_SOURCES = ("device", "host", "disk", "recomputed", "new")
# How long a scrape waits for the engine thread to answer before it reports the last snapshot.
SNAPSHOT_TIMEOUT_S = 5.0

# vLLM's buckets (seconds), so the same dashboards work.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
TPOT_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


@dataclass
class EngineSnapshot:
    """The engine's state at one moment, gathered on the engine thread."""

    running: int = 0
    waiting: int = 0
    device_blocks: int = 0
    device_free_blocks: int = 0  # empty or holding only an unreferenced cached prefix
    device_cached_blocks: int = 0  # holding a findable prefix (referenced or not)
    device_usage: float = 0.0  # referenced blocks / all blocks, as vLLM's kv_cache_usage_perc
    pinned_blocks: int = 0
    host_slots: int = 0
    host_used: int = 0
    disk_capacity_bytes: int = 0
    disk_used_bytes: int = 0
    disk_blocks: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    preemptions: int = 0
    swap_in_bytes: int = 0
    swap_out_bytes: int = 0
    disk_write_bytes: int = 0
    fetched_blocks: dict[str, int] = field(default_factory=dict)
    offloaded_blocks: int = 0
    dropped_blocks: int = 0

    aborted: dict[str, int] = field(default_factory=dict)
    disk_corrupt_blocks: int = 0
    host_checksum_failures: int = 0
    import_rejected_chunks: int = 0
    interrupted_turns: int = 0  # turns a restart found pending (the session layer's count)

    @classmethod
    def from_stats(cls, stats: EngineStats) -> EngineSnapshot:
        load = stats.load
        tiers = stats.tier_stats
        disk = stats.disk_stats or {}
        return cls(
            running=load.num_running,
            waiting=load.num_waiting,
            device_blocks=load.device_blocks_total,
            device_free_blocks=load.device_blocks_free,
            device_cached_blocks=stats.device_cached_blocks,
            device_usage=stats.device_usage,
            pinned_blocks=load.device_blocks_pinned,
            host_slots=load.host_blocks_total,
            host_used=load.host_blocks_used,
            disk_capacity_bytes=stats.disk_capacity_bytes,
            disk_used_bytes=stats.disk_used_bytes,
            disk_blocks=load.disk_blocks_used,
            prefix_queries=stats.prefix_queries,
            prefix_hits=stats.prefix_hits,
            preemptions=load.num_preemptions,
            swap_in_bytes=tiers["swap_in_bytes"],
            swap_out_bytes=tiers["swap_out_bytes"],
            disk_write_bytes=tiers["disk_write_bytes"],
            fetched_blocks=dict(tiers["fetched_blocks"]),
            offloaded_blocks=tiers["offloaded_blocks"],
            dropped_blocks=tiers["dropped_blocks"],
            aborted=dict(stats.num_aborted),
            disk_corrupt_blocks=disk.get("num_corrupt", 0) + disk.get("num_mismatch", 0),
            host_checksum_failures=stats.host_checksum_failures,
            import_rejected_chunks=stats.import_rejected_chunks,
        )


def prompt_token_sources(output: RequestOutput) -> dict[str, int]:
    """Split a request's prompt tokens by where their KV came from; the parts sum to the
    prompt length. ``cached_tokens_by_tier`` is what admission *found* per tier; the engine's
    ``num_cached_tokens`` is what it *used*. Tokens found but not used (a failed fetch) are
    taken off the slowest tiers first; cached tokens beyond the found blocks (a reused partial
    tail block) are credited to the device."""
    prompt = len(output.prompt_token_ids)
    cached = min(max(output.num_cached_tokens, 0), prompt)
    found = {tier: max(output.cached_tokens_by_tier.get(tier, 0), 0) for tier in TOKEN_SOURCES[:3]}
    excess = sum(found.values()) - cached
    for tier in ("disk", "host", "device"):
        if excess <= 0:
            break
        cut = min(excess, found[tier])
        found[tier] -= cut
        excess -= cut
    if excess < 0:
        found["device"] -= excess
    recomputed = min(max(output.num_redundant_tokens, 0), prompt - cached)
    return {**found, "recomputed": recomputed, "new": prompt - cached - recomputed}


class _EngineCollector(Collector):
    """Exports an ``EngineSnapshot``: gauges, and the engine's own cumulative counters."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.snapshot = EngineSnapshot()

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot
        model = self.model_name

        def gauge(name: str, doc: str, value: float, **labels: str) -> GaugeMetricFamily:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name", *labels])
            family.add_metric([model, *labels.values()], value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([model], value)
            return family

        yield gauge("num_requests_running", "Requests in the running batch.", s.running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", s.waiting)
        yield gauge(
            "kv_cache_usage_perc",
            "Fraction of device KV blocks referenced by requests (1 = full).",
            s.device_usage,
        )
        yield gauge(
            "kv_pinned_blocks",
            "Device blocks pinned by retention TTLs or hints.",
            s.pinned_blocks,
        )
        tier_blocks = GaugeMetricFamily(
            PREFIX + "kv_tier_blocks",
            "KV blocks per tier: capacity, used (holding KV), free (device: allocatable), "
            "cached (device: findable prefix blocks).",
            labels=["model_name", "tier", "state"],
        )
        used = s.device_blocks - s.device_free_blocks
        for tier, state, value in (
            ("device", "capacity", s.device_blocks),
            ("device", "used", used),
            ("device", "free", s.device_free_blocks),
            ("device", "cached", s.device_cached_blocks),
            ("host", "capacity", s.host_slots),
            ("host", "used", s.host_used),
            ("disk", "used", s.disk_blocks),
        ):
            tier_blocks.add_metric([model, tier, state], value)
        yield tier_blocks
        disk_bytes = GaugeMetricFamily(
            PREFIX + "kv_disk_bytes",
            "Disk KV tier size in bytes (capacity 0: no disk tier).",
            labels=["model_name", "state"],
        )
        disk_bytes.add_metric([model, "capacity"], s.disk_capacity_bytes)
        disk_bytes.add_metric([model, "used"], s.disk_used_bytes)
        yield disk_bytes
        tier_usage = GaugeMetricFamily(
            PREFIX + "kv_tier_usage_perc",
            "Fraction of each lower KV tier in use (host: slots, disk: bytes).",
            labels=["model_name", "tier"],
        )
        tier_usage.add_metric([model, "host"], s.host_used / s.host_slots if s.host_slots else 0)
        tier_usage.add_metric(
            [model, "disk"],
            s.disk_used_bytes / s.disk_capacity_bytes if s.disk_capacity_bytes else 0,
        )
        yield tier_usage

        yield counter(
            "prefix_cache_queries_total",
            "Prompt tokens looked up in the prefix cache at admission.",
            s.prefix_queries,
        )
        yield counter(
            "prefix_cache_hits_total",
            "Prompt tokens found cached (any tier) at admission.",
            s.prefix_hits,
        )
        yield counter(
            "num_preemptions_total", "Requests preempted to free KV blocks.", s.preemptions
        )
        swap = CounterMetricFamily(
            PREFIX + "swap_bytes_total",
            "KV bytes copied between device and host (in: to the device).",
            labels=["model_name", "direction"],
        )
        swap.add_metric([model, "in"], s.swap_in_bytes)
        swap.add_metric([model, "out"], s.swap_out_bytes)
        yield swap
        yield counter(
            "kv_disk_write_bytes_total", "KV bytes written to the disk tier.", s.disk_write_bytes
        )
        fetched = CounterMetricFamily(
            PREFIX + "kv_fetched_blocks_total",
            "KV blocks fetched up to the device, by the tier they came from.",
            labels=["model_name", "tier"],
        )
        for tier in ("host", "disk"):
            fetched.add_metric([model, tier], s.fetched_blocks.get(tier, 0))
        yield fetched
        yield counter(
            "kv_offloaded_blocks_total",
            "Device blocks copied to host ahead of eviction.",
            s.offloaded_blocks,
        )
        yield counter(
            "kv_dropped_blocks_total",
            "Device blocks evicted with no lower copy (recomputed if needed again).",
            s.dropped_blocks,
        )
        aborted = CounterMetricFamily(
            PREFIX + "request_aborted_total",
            "Requests aborted before they finished, by reason (client: disconnect or cancel;"
            " error: an engine failure; shutdown).",
            labels=["model_name", "reason"],
        )
        for reason, count in sorted(s.aborted.items()):
            aborted.add_metric([model, reason], count)
        yield aborted
        corrupt = CounterMetricFamily(
            PREFIX + "kv_corrupt_blocks_total",
            "KV copies that failed verification and were recomputed instead (disk: checksum or"
            " header; host: checksum; import: layer chunks of imported KV).",
            labels=["model_name", "tier"],
        )
        corrupt.add_metric([model, "disk"], s.disk_corrupt_blocks)
        corrupt.add_metric([model, "host"], s.host_checksum_failures)
        corrupt.add_metric([model, "import"], s.import_rejected_chunks)
        yield corrupt
        yield counter(
            "interrupted_turns_total",
            "Turns found pending at start-up (the server stopped mid-turn); they were marked"
            " interrupted and are not part of their session's history.",
            s.interrupted_turns,
        )


class ServerMetrics:
    """One server's metrics. ``on_step`` is the ``AsyncEngine`` hook (engine thread);
    ``render`` produces the exposition text (event loop)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.engine_state = _EngineCollector(model_name)
        self.registry.register(self.engine_state)
        labels = ["model_name"]
        reg = self.registry

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(PREFIX + name, doc, labels, registry=reg, buckets=buckets).labels(
                model_name
            )

        self.ttft = histogram(
            "time_to_first_token_seconds", "Time from arrival to the first token.", TTFT_BUCKETS
        )
        self.tpot = histogram(
            "time_per_output_token_seconds",
            "Mean time per output token after the first, per finished request.",
            TPOT_BUCKETS,
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds",
            "Time from arrival to the last token, per finished request.",
            E2E_BUCKETS,
        )
        self.step_time = histogram(
            "engine_step_seconds", "Wall time of one engine step.", STEP_BUCKETS
        )
        self.prompt_len = histogram(
            "request_prompt_tokens", "Prompt length per request.", TOKEN_BUCKETS
        )
        self.generation_len = histogram(
            "request_generation_tokens", "Generated tokens per finished request.", TOKEN_BUCKETS
        )
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens of requests that started.", labels,
            registry=reg,
        ).labels(model_name)  # fmt: skip
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Tokens generated.", labels, registry=reg
        ).labels(model_name)
        by_source = Counter(
            PREFIX + "prompt_tokens_by_source",
            "Prompt tokens by where their KV came from: cached on device / host / disk, "
            "recomputed although an earlier turn of the session had computed them, or new.",
            [*labels, "source"],
            registry=reg,
        )
        self.prompt_sources = {s: by_source.labels(model_name, s) for s in TOKEN_SOURCES}
        self._success = Counter(
            PREFIX + "request_success",
            "Finished requests by finish reason.",
            [*labels, "finished_reason"],
            registry=reg,
        )
        for reason in ("stop", "length"):
            self._success.labels(model_name, reason)  # present (at 0) from the start

    # ------------------------------------------------------------------ engine thread
    def on_step(self, outputs: list[RequestOutput], step_s: float) -> None:
        """Record one engine step's outputs (the ``AsyncEngine`` ``on_step`` hook)."""
        self.step_time.observe(step_s)
        for output in outputs:
            self.observe(output)

    def observe(self, output: RequestOutput) -> None:
        completion = output.outputs[0]
        new_tokens = len(completion.delta_token_ids)
        if new_tokens:
            self.generation_tokens.inc(new_tokens)
        if new_tokens and new_tokens == len(completion.token_ids):  # its first output
            self.prompt_tokens.inc(len(output.prompt_token_ids))
            self.prompt_len.observe(len(output.prompt_token_ids))
            for source, count in prompt_token_sources(output).items():
                if count:
                    self.prompt_sources[source].inc(count)
            if "ttft_s" in output.metrics:
                self.ttft.observe(output.metrics["ttft_s"])
        if not output.finished:
            return
        self._success.labels(self.model_name, completion.finish_reason or "unknown").inc()
        self.generation_len.observe(len(completion.token_ids))
        e2e = output.metrics.get("e2e_s")
        if e2e is None:
            return
        self.e2e.observe(e2e)
        ttft = output.metrics.get("ttft_s")
        if ttft is not None and len(completion.token_ids) > 1:
            self.tpot.observe(max(e2e - ttft, 0.0) / (len(completion.token_ids) - 1))

    # ------------------------------------------------------------------ event loop
    def render(self, snapshot: EngineSnapshot | None = None) -> bytes:
        """The exposition text; ``snapshot`` (if given) becomes the engine state reported.
        Setting and rendering happen without an ``await`` in between, so concurrent scrapes
        on the event loop cannot mix snapshots."""
        if snapshot is not None:
            self.engine_state.snapshot = snapshot
        return generate_latest(self.registry)


def attach_metrics(state: ServerState) -> ServerMetrics:
    """Create a ``ServerMetrics`` for an already running server state: registers it in
    ``state.extras`` and chains its hook after any ``on_step`` the engine already has."""
    metrics = ServerMetrics(state.model_name)
    previous = state.engine.on_step
    if previous is None:
        state.engine.on_step = metrics.on_step
    else:

        def both(outputs: list[RequestOutput], step_s: float) -> None:
            previous(outputs, step_s)
            metrics.on_step(outputs, step_s)

        state.engine.on_step = both
    state.extras["metrics"] = metrics
    return metrics


@router.get("/metrics", include_in_schema=False)
async def metrics_endpoint(request: Request) -> Response:
    state = get_state(request)
    metrics: ServerMetrics | None = state.extras.get("metrics")
    if metrics is None:
        raise APIError(404, "metrics are not enabled on this server")
    snapshot: EngineSnapshot | None = None
    try:
        stats = await asyncio.wait_for(state.engine.call(GetStats()), timeout=SNAPSHOT_TIMEOUT_S)
        snapshot = EngineSnapshot.from_stats(stats)
        snapshot.interrupted_turns = state.sessions.num_interrupted_turns
    except Exception as exc:  # stopping or stuck: report the last snapshot
        log.debug("metrics: engine snapshot unavailable (%s)", exc)
    return Response(metrics.render(snapshot), media_type=CONTENT_TYPE_LATEST)
