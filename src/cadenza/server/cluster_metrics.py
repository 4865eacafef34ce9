"""Cluster metrics on ``/metrics`` (with ``--workers N``): per worker and for the router.

Read at scrape time from the router's own counters (``ClusterStats``) and each worker's last
load snapshot — no extra call to the workers. Names follow the server's ``cadenza:`` prefix:

* per worker (label ``worker``): running / waiting / in-flight requests, device blocks used
  and total, host blocks used, up (1 alive, 0 dead), failures;
* routing decisions by reason, hint outcomes (found / late / false / missing), migrations by
  kind (count, aborted), bytes and seconds moved, live-migration downtime, failovers;
* load imbalance: the latest max / mean outstanding requests over workers, and its time mean;
* prompt tokens by source: local device / host / disk cache, migrated, recomputed history
  (redundant prefill), new.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cadenza.cluster.cluster_stats import HINT_OUTCOMES, MIGRATION_KINDS, TOKEN_SOURCES

PREFIX = "cadenza:"


class ClusterCollector(Collector):
    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster

    def collect(self) -> Iterator[Metric]:
        cluster = self.cluster
        stats = cluster.stats
        yield from self._workers(cluster)

        def counter(name: str, doc: str, label: str, values: dict[str, float]) -> Metric:
            family = CounterMetricFamily(PREFIX + name, doc, labels=[label])
            for key, value in sorted(values.items()):
                family.add_metric([key], value)
            return family

        yield counter(
            "cluster_routing_decisions", "Turns placed, by the policy's reason.", "reason",
            dict(stats.placements),
        )  # fmt: skip
        yield counter(
            "cluster_hint_outcomes",
            "Hinted and unhinted session turns: found (its KV was where it ran), late, false"
            " (no turn followed), missing (no hint).",
            "outcome",
            {o: stats.hint_outcomes.get(o, 0) for o in HINT_OUTCOMES},
        )
        yield counter(
            "cluster_hinted_moves",
            "Hinted turns whose KV the hint moved to another worker: found there, or late.",
            "outcome",
            {o: stats.hinted_moves.get(o, 0) for o in ("found", "late")},
        )
        # Every kind from the start (at 0), so a rate over the first migration has a sample
        # before it.
        yield counter(
            "cluster_migrations", "KV migrations completed, by kind.", "kind",
            dict.fromkeys(MIGRATION_KINDS, 0) | stats.migrations,
        )  # fmt: skip
        yield counter(
            "cluster_migrations_aborted", "KV migrations that failed or moved nothing.", "kind",
            dict.fromkeys(MIGRATION_KINDS, 0) | stats.migrations_aborted,
        )  # fmt: skip
        yield counter(
            "cluster_prompt_tokens_by_source",
            "Prompt tokens by where their KV came from.",
            "source",
            {s: stats.tokens_by_source.get(s, 0) for s in TOKEN_SOURCES},
        )
        yield CounterMetricFamily(
            PREFIX + "cluster_migration_bytes", "Bytes of KV moved.", value=stats.migration_bytes
        )
        yield CounterMetricFamily(
            PREFIX + "cluster_migration_seconds",
            "Time spent moving KV (sum over migrations).",
            value=stats.migration_seconds,
        )
        downtimes = [d for d, _ in stats.live_migration_downtimes]
        yield CounterMetricFamily(
            PREFIX + "cluster_live_migration_downtime_seconds",
            "Stop-to-first-token time of live-migrated requests (sum).",
            value=sum(downtimes),
        )
        yield CounterMetricFamily(
            PREFIX + "cluster_live_migrations", "Live migrations.", value=len(downtimes)
        )
        yield CounterMetricFamily(
            PREFIX + "cluster_failovers",
            "Requests resubmitted after their worker died.",
            value=stats.failovers,
        )
        latest = stats.imbalance[-1] if stats.imbalance else None
        ratio = latest[1] / latest[2] if latest and latest[2] > 0 else 1.0
        yield GaugeMetricFamily(
            PREFIX + "cluster_load_imbalance",
            "Max / mean outstanding requests over live workers (latest sample).",
            value=ratio,
        )
        yield GaugeMetricFamily(
            PREFIX + "cluster_load_imbalance_mean",
            "Time mean of max / mean outstanding requests over workers.",
            value=stats.imbalance_ratio(),
        )

    def _workers(self, cluster: Any) -> Iterator[Metric]:
        names = {
            "running": "Requests running on the worker.",
            "waiting": "Requests waiting on the worker.",
            "in_flight": "Requests the router has placed on the worker.",
            "device_blocks_used": "Device KV blocks in use.",
            "device_blocks_total": "Device KV blocks.",
            "host_blocks_used": "Host KV blocks in use.",
            "up": "1 while the worker is alive.",
        }
        families = {
            key: GaugeMetricFamily(PREFIX + "worker_" + key, doc, labels=["worker"])
            for key, doc in names.items()
        }
        failures = CounterMetricFamily(
            PREFIX + "worker_failures", "Times the worker was found dead.", labels=["worker"]
        )
        for slot in cluster.slots.values():
            load = slot.load
            wid = [slot.worker_id]
            values = {
                "running": load.num_running if load else 0,
                "waiting": load.num_waiting if load else 0,
                "in_flight": len(slot.requests),
                "device_blocks_used": load.device_blocks_used if load else 0,
                "device_blocks_total": load.device_blocks_total if load else 0,
                "host_blocks_used": load.host_blocks_used if load else 0,
                "up": 1 if slot.alive else 0,
            }
            for key, value in values.items():
                families[key].add_metric(wid, value)
            failures.add_metric(wid, slot.failures)
        yield from families.values()
        yield failures
