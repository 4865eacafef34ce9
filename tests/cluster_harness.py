"""A real server (uvicorn, real sockets) over a cluster router, inside the test process.

The router's pull loops run on uvicorn's event loop (started by the app's lifespan); tests
reach router internals (``server.cluster``) only to read counters or to kill a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import uvicorn
from tests.server_harness import free_port

from cadenza.cluster.router import ClusterEngine
from cadenza.cluster.worker_handle import WorkerHandle
from cadenza.server.app import build_app
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
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(build_app(state), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield ClusterServer(f"http://127.0.0.1:{port}", state, server)
    finally:
        server.should_exit = True
        thread.join(60)
