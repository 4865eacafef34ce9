"""A real server (uvicorn, real sockets) over a cluster router, inside the test process.

The router's pull loops run on uvicorn's event loop (started by the app's lifespan); tests
reach router internals (``server.cluster``) only to read counters or to kill a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import uvicorn
from tests.server_harness import serving

from cadenza.cluster.router import ClusterEngine
from cadenza.cluster.worker_handle import WorkerHandle
from cadenza.server.cluster_metrics import ClusterCollector
from cadenza.server.metrics import ServerMetrics
from cadenza.server.state import ServerState


@dataclass
class ClusterServer:
    base_url: str
    state: ServerState
    server: uvicorn.Server

    @property
    def cluster(self) -> ClusterEngine:
        return self.state.engine  # type: ignore[return-value]


@contextlib.contextmanager
def running_cluster_server(
    handles: Sequence[WorkerHandle], config: Any, model: str, **router_options: Any
) -> Iterator[ClusterServer]:
    cluster = asyncio.run(ClusterEngine.connect(handles, config, **router_options))
    metrics = ServerMetrics(model)
    cluster.on_step = metrics.on_step
    metrics.registry.register(ClusterCollector(cluster))
    state = ServerState(cluster, model)  # type: ignore[arg-type]
    state.extras["metrics"] = metrics
    with serving(state, timeout_s=60) as (base_url, server):
        yield ClusterServer(base_url, state, server)
